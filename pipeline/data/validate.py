"""Stage ``validate``: a Great Expectations (1.x) suite on the manifest, kept in code.

Each expectation carries a severity in its ``meta``: a failed *critical* expectation
stops the pipeline (:class:`ValidationFailed` names each failure and its observed
value); *warning* failures are reported but pass unless ``validate.fail_on_warning``.

Critical: row count within ``[min_rows, max_rows]`` (the floor only guards against an empty
or unsplittable dataset), non-null ids/labels, labels in the class set, unique sha256 and
image ids, image sides within the ingest size range (recorded by ingest, so
``xrayops validate DIR`` judges DIR by the source it came from), bit depth 8/16, 1 or 3
channels, per-image mean in [0, 1] and std in [0, 0.5], at least one image per patient; for
radiograph sources also modality, photometric interpretation and view within ``data.admission``
(missing values pass: a PNG has no photometric field), so a manifest with CT rows fails.
Warning: fewer rows than ``warn_min_rows``, mixed bit depths, mean/std outside the
expected ranges, a patient with more than ``max_images_per_patient`` images, a class with
no images, positive-class prevalence outside ``prevalence_range``.

No patient data reaches GX: the frame it sees has patient ids replaced by per-run
integer codes and no file paths; result JSON and Data Docs carry aggregate values only.
Outputs: ``<dataset>/validation/result.json`` and ``validation/data_docs/index.html``. The result
records ``manifest_sha256``, the sha256 of the ``manifest.parquet`` bytes that were validated,
so the promotion gate can tell a result that describes another (older) manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Settings
from pipeline.data.manifest import dataset_lock, read_summary
from pipeline.data.split import read_bound_manifest
from pipeline.errors import ValidationFailed

logger = logging.getLogger(__name__)

SUITE_NAME = "xrayops_manifest"
RESULT_FILE = "result.json"
# Summary-level results only: no lists of unexpected values (they could carry data).
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 0, "include_unexpected_rows": False}


@dataclass(frozen=True)
class Check:
    """One expectation with its severity."""

    expectation: Any
    severity: str  # "critical" | "warning"


def build_checks(settings: Settings, classes: list[str], positive: str | None,
                 size_range: tuple[int, int], radiographs: bool = True) -> list[Check]:
    """The expectation suite for a manifest of ``classes`` (``radiographs``: a chest X-ray source, whose rows
    must also be what ``data.admission`` admits)."""
    import great_expectations.expectations as gxe

    v = settings.validate_
    crit: list[Any] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=v.min_rows, max_value=v.max_rows),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("image_id", "patient_code", "label", "sha256")],
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=size_range[0], max_value=size_range[1]),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=size_range[0], max_value=size_range[1]),
        gxe.ExpectColumnValuesToBeInSet(column="bit_depth", value_set=[8, 16]),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[1, 3]),
        gxe.ExpectColumnValuesToBeBetween(column="mean", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=0.0, max_value=0.5),
        gxe.ExpectColumnValuesToBeBetween(column="patient_image_count", min_value=1),
    ]
    if radiographs:  # a CT or a lateral that reached the manifest (an old ingest, a lax policy) stops here
        policy = settings.data.admission
        crit += [
            gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=[*policy.modalities, "CXR"]),
            gxe.ExpectColumnValuesToBeInSet(column="photometric", value_set=policy.photometric),
            gxe.ExpectColumnValuesToBeInSet(column="view_position", value_set=policy.views),
        ]
    warn: list[Any] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=v.warn_min_rows, max_value=v.max_rows),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="bit_depth", min_value=1, max_value=1),
        gxe.ExpectColumnMeanToBeBetween(column="mean", min_value=v.mean_range[0], max_value=v.mean_range[1]),
        gxe.ExpectColumnValuesToBeBetween(column="mean", min_value=v.mean_range[0], max_value=v.mean_range[1],
                                          mostly=0.99),
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=v.std_range[0], max_value=v.std_range[1],
                                          mostly=0.99),
        gxe.ExpectColumnMaxToBeBetween(column="patient_image_count", min_value=1,
                                       max_value=v.max_images_per_patient),
        gxe.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=classes),
    ]
    if positive is not None:
        warn.append(gxe.ExpectColumnMeanToBeBetween(column="is_positive", min_value=v.prevalence_range[0],
                                                    max_value=v.prevalence_range[1]))
    return [Check(e, "critical") for e in crit] + [Check(e, "warning") for e in warn]


def gx_frame(manifest: pd.DataFrame, positive: str | None) -> pd.DataFrame:
    """The manifest as GX sees it: no paths, patient ids replaced by per-run integer codes."""
    df = manifest.drop(columns=[c for c in ("path", "patient_id", "phash") if c in manifest]).copy()
    codes, _ = pd.factorize(manifest["patient_id"])
    df["patient_code"] = pd.Series(codes, index=manifest.index).where(manifest["patient_id"].notna())
    df["patient_image_count"] = manifest.groupby("patient_id", dropna=False)["image_id"].transform("count")
    if positive is not None:
        df["is_positive"] = (manifest["label"] == positive).astype(float)
    return df


def run_validation(settings: Settings, dataset_dir: Path | None = None) -> dict[str, Any]:
    """Validate ``manifest.parquet``; writes results and Data Docs; returns the summary.

    Raises:
        ValidationFailed: a critical expectation failed (or a warning with ``fail_on_warning``).
    """
    dataset_dir = dataset_dir or settings.dataset_dir
    with dataset_lock(settings, dataset_dir):  # overlapping runs take turns (pipeline.locking)
        return _validate_locked(settings, dataset_dir)


def _validate_locked(settings: Settings, dataset_dir: Path) -> dict[str, Any]:
    summary = read_summary(dataset_dir)
    classes = list(summary.get("classes") or settings.data.classes or [])
    positive = summary.get("positive_class")
    manifest, manifest_sha = read_bound_manifest(dataset_dir)
    if not classes:
        classes = sorted(manifest["label"].dropna().unique())
    size_range = tuple(settings.validate_.size_range or summary.get("size_range") or _source_size_range(settings))
    modality = summary.get("profile_modality") or _source_profile(settings).modality
    checks = build_checks(settings, classes, positive, size_range, radiographs=modality == "CXR")  # type: ignore[arg-type]
    out_dir = dataset_dir / "validation"
    result = _run_gx(checks, gx_frame(manifest, positive), out_dir)
    result.update({"dataset": summary.get("dataset"), "rows": int(len(manifest)), "manifest_sha256": manifest_sha})
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    failures = result["critical_failures"] + (result["warning_failures"] if settings.validate_.fail_on_warning else [])
    logger.info("validation: %d checks, %d critical and %d warning failures",
                len(result["checks"]), len(result["critical_failures"]), len(result["warning_failures"]))
    if failures:
        raise ValidationFailed(describe_failures(result, failures))
    return result


def _source_size_range(settings: Settings) -> tuple[int, int]:
    return _source_profile(settings).size_range


def _source_profile(settings: Settings) -> Any:
    from pipeline.data.sources import get_source

    return get_source(settings).profile


def describe_failures(result: dict[str, Any], names: list[str]) -> str:
    by_name = {c["name"]: c for c in result["checks"]}
    lines = [f"data validation failed ({len(names)} check(s)); see {result.get('data_docs')}"]
    for name in names:
        c = by_name[name]
        lines.append(f"  - [{c['severity']}] {name}: observed {c['observed']}, expected {c['expected']}")
    lines.append("Fix the data (or, if the limits are wrong, the validate.* settings in params.yaml).")
    return "\n".join(lines)


def _run_gx(checks: list[Check], frame: pd.DataFrame, out_dir: Path) -> dict[str, Any]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_root = out_dir / "gx"
    shutil.rmtree(gx_root, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(out_dir))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_or_update_pandas("manifest")
    asset = source.add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for check in checks:
        check.expectation.meta = {"severity": check.severity}
        suite.add_expectation(check.expectation)
    suite = ctx.suites.add_or_update(suite)
    vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name="manifest", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(name="manifest", validation_definitions=[vd], result_format=RESULT_FORMAT,
                      actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")])
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    validation = next(iter(run.run_results.values()))
    return _summarise(validation, ctx, out_dir)


def _summarise(validation: Any, ctx: Any, out_dir: Path) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []
    seen: set[str] = set()
    ordered = sorted(validation.results, key=lambda r: (r.expectation_config.meta or {}).get("severity", ""))
    for r in ordered:  # critical first, so a duplicated name gets the "[warning]" suffix
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
        column = kwargs.pop("column", None)
        name = f"{cfg.type}" + (f"({column})" if column else "")
        if name in seen:  # same expectation type and column at two severities
            name += f"[{(cfg.meta or {}).get('severity', 'critical')}]"
        seen.add(name)
        res = r.result or {}
        observed = res.get("observed_value")
        if observed is None and "unexpected_count" in res:
            observed = f"{res['unexpected_count']} unexpected ({res.get('unexpected_percent') or 0:.2f}%)"
        checks.append({
            "name": name,
            "severity": (cfg.meta or {}).get("severity", "critical"),
            "success": bool(r.success),
            "observed": _safe(observed),
            "expected": {k: _safe(v) for k, v in kwargs.items()},
        })
    checks.sort(key=lambda c: (c["severity"], c["name"]))
    docs = _data_docs(ctx, out_dir)
    return {
        "success": bool(validation.success),
        "statistics": dict(validation.statistics),
        "checks": checks,
        "critical_failures": [c["name"] for c in checks if not c["success"] and c["severity"] == "critical"],
        "warning_failures": [c["name"] for c in checks if not c["success"] and c["severity"] == "warning"],
        "data_docs": docs,
    }


def _safe(value: Any) -> Any:
    """Aggregate values only: lists are summarised by length so no row values leak."""
    if isinstance(value, (list, tuple, set)) and len(value) > 12:
        return f"<{len(value)} values>"
    if isinstance(value, (list, tuple, set)):
        return [_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy scalar → Python
    if isinstance(value, float):
        return round(value, 6)
    return value


def _data_docs(ctx: Any, out_dir: Path) -> str | None:
    """Copy the generated Data Docs site to ``validation/data_docs`` and return its index."""
    site = out_dir / "gx" / "uncommitted" / "data_docs" / "local_site"
    dest = out_dir / "data_docs"
    if not site.exists():
        return None
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(site, dest)
    return str(dest / "index.html")


def read_validation(dataset_dir: Path) -> dict[str, Any] | None:
    path = dataset_dir / "validation" / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None
