"""Stage ``register`` + ``promote``: MLflow registry versions, the promotion gate, alias moves.

Every evaluated model becomes a new version with lineage tags and alias ``challenger``.
The gate re-scores the current ``champion`` on the *same* test images (stored numbers
are not trusted) and promotes only when every criterion passes; with no champion only
the absolute floors apply. Alias moves are ordered so an interruption leaves them
consistent: ``previous-champion`` is set to the old champion *before* ``champion`` moves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.evaluate import EvalResult, Scored, predict_proba
from pipeline.inputs import InputSpec, check_files, load_images
from pipeline.metrics import binary_metrics, paired_delta_auc, patient_weights
from pipeline.split import LeakageError, verify_certificate
from pipeline.tracking import code_version, configure_mlflow
from pipeline.train import TrainResult
from pipeline.validate import read_validation

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


@dataclass
class Criterion:
    name: str
    value: float | int | bool | None
    threshold: str
    passed: bool


@dataclass
class GateDecision:
    """The promotion decision, as stored on the version and logged as JSON."""

    model: str
    challenger_version: str
    champion_version: str | None
    criteria: list[Criterion]
    promote: bool
    reason: str
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.criteria if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        rows = "\n".join(f"| {c.name} | {c.value} | {c.threshold} | {'✅' if c.passed else '❌'} |"
                         for c in self.criteria)
        verdict = "**PROMOTE**" if self.promote else "**KEEP CHAMPION**"
        return (f"### Promotion gate: {self.model} v{self.challenger_version} → {verdict}\n\n"
                f"Champion compared: {self.champion_version or 'none (absolute floors only)'}\n\n"
                f"| criterion | value | threshold | pass |\n|---|---|---|---|\n{rows}\n\n{self.reason}\n")


# --------------------------------------------------------------------------- registration


def register_version(settings: Settings, trained: TrainResult, evaluation: EvalResult) -> Any:
    """Create a registry version of the trained model with lineage tags and alias ``challenger``."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    name = settings.registered_model
    try:
        client.create_registered_model(name, description=f"xrayops models for dataset {settings.dataset_name}")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    tags = version_tags(settings, trained, evaluation)
    # a LoggedModel source (models:/m-<id>) must name its model_id, or an MLflow *server* rejects it
    model_id = trained.model_uri.removeprefix("models:/") if trained.model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, source=trained.model_uri, run_id=trained.run_id, tags=tags,
                                     description=describe(trained, evaluation), model_id=model_id)
    _wait_ready(client, name, mv.version)
    for key, value in export_tags(settings, trained, evaluation).items():
        client.set_model_version_tag(name, mv.version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    logger.info("registered %s version %s (alias %s)", name, mv.version, CHALLENGER)
    publish_card(settings, mv.version)
    return client.get_model_version(name, mv.version)


def publish_card(settings: Settings, version: str) -> Path | None:
    """(Re)write the version's model card; a failure is logged, never fatal to promotion."""
    from pipeline.modelcard import publish_model_card

    try:
        return publish_model_card(settings, version)
    except Exception:
        logger.exception("could not write the model card of v%s", version)
        return None


def _wait_ready(client: Any, name: str, version: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while client.get_model_version(name, version).status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model version {name}/{version} still pending after {timeout:.0f}s")
        time.sleep(0.2)


def export_tags(settings: Settings, trained: TrainResult, evaluation: EvalResult, n_sample: int = 8) -> dict[str, str]:
    """Log SavedModel + ONNX exports to the training run; the parity result as version tags."""
    from pipeline.export import log_exports

    test = evaluation.test
    if trained.model is None or test is None or test.frame.empty:
        logger.warning("no in-memory model or test images: skipping export")
        return {"export_saved_model": "skipped"}
    paths = test.frame["path"].tolist()[:n_sample]
    sample = load_images(check_files(settings.dataset_dir, paths), InputSpec(**trained.input))
    return log_exports(trained.model, trained.run_id, sample, onnx=settings.promote.export_onnx)


def version_tags(settings: Settings, trained: TrainResult, evaluation: EvalResult) -> dict[str, str]:
    """Lineage and headline tags of a registry version (all strings, no patient data)."""
    tags = {
        **code_version(settings.root),
        "seed": str(settings.base.seed),
        "dataset": str(trained.dataset.get("name")),
        "dvc_md5": str(trained.dataset.get("dvc_md5")),
        "dvc_rev": str(trained.dataset.get("dvc_rev")),
        "split_certificate": str(trained.dataset.get("split_certificate")),
        "model_arch": trained.model_name,
        "input_size": str(trained.input["image_size"]),
        "input_channels": str(trained.input["channels"]),
        "classes": json.dumps(trained.classes),
        "positive_class": str(trained.positive_class),
        "task": evaluation.task,
    }
    if evaluation.operating_point:
        tags["operating_threshold"] = f"{evaluation.operating_point['threshold']:.6f}"
        tags["threshold_policy"] = evaluation.operating_point["policy"]
    explain = evaluation.explain or {}
    tags["gradcam_sanity"] = str(explain.get("status", "not_run"))
    if (explain.get("sanity") or {}).get("rank_corr") is not None:
        tags["gradcam_sanity_rank_corr"] = str(explain["sanity"]["rank_corr"])
    for key in ("auc", "sensitivity", "specificity", "accuracy", "macro_f1", "ece"):
        if evaluation.metrics.get(key) is not None:
            lo, hi = evaluation.ci.get(key, [None, None])
            tags[f"test_{key}"] = f"{evaluation.metrics[key]:.4f} [{lo}, {hi}]"
    return tags


def describe(trained: TrainResult, evaluation: EvalResult) -> str:
    m, ci = evaluation.metrics, evaluation.ci
    parts = [f"{trained.model_name} on {trained.dataset.get('name')} (DVC {str(trained.dataset.get('dvc_md5'))[:12]})"]
    for key in ("auc", "sensitivity", "specificity", "accuracy"):
        if m.get(key) is not None and key in ci:
            parts.append(f"{key} {m[key]:.3f} (95% CI {ci[key][0]:.3f}-{ci[key][1]:.3f})")
    if evaluation.operating_point:
        parts.append(f"threshold {evaluation.operating_point['threshold']:.4f} ({evaluation.operating_point['policy']})")
    return "; ".join(parts)


# --------------------------------------------------------------------------- champion access


def get_alias(settings: Settings, alias: str) -> Any | None:
    """The version holding ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    try:
        return client.get_model_version_by_alias(settings.registered_model, alias)
    except MlflowException:
        return None


def load_version_model(settings: Settings, version: Any) -> Any:
    """Load the Keras model of a registry version."""
    import mlflow

    from pipeline.models.registry import register_custom_objects

    register_custom_objects()
    configure_mlflow(settings)
    return mlflow.keras.load_model(f"models:/{settings.registered_model}/{version.version}")


def rescore(settings: Settings, version: Any, test: Scored, dataset_dir: Path) -> np.ndarray:
    """Score another registry version on the same test images."""
    ispec = InputSpec(int(version.tags["input_size"]), int(version.tags["input_channels"]),
                      len(json.loads(version.tags["classes"])))
    images = load_images(check_files(dataset_dir, test.frame["path"].tolist()), ispec)
    return predict_proba(load_version_model(settings, version), images)


# --------------------------------------------------------------------------- gate


def gate(settings: Settings, challenger: Any, evaluation: EvalResult, dataset_dir: Path | None = None) -> GateDecision:
    """Decide whether ``challenger`` may become champion (see the module docstring)."""
    dataset_dir = dataset_dir or settings.dataset_dir
    cfg, ev = settings.promote, settings.evaluate
    champion = get_alias(settings, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        champion = None
    test = evaluation.test
    assert test is not None, "gate needs the evaluation's test scores"
    criteria: list[Criterion] = []
    inputs: dict[str, Any] = {"test_images": int(len(test.y)),
                              "test_patients": int(test.frame["patient_id"].nunique()),
                              "bootstrap_resamples": ev.bootstrap_resamples, "ci_level": ev.ci_level}
    m, ci = evaluation.metrics, evaluation.ci
    if evaluation.task == "binary":
        criteria.append(Criterion("auc_floor", m["auc"], f">= {cfg.min_auc}", _ge(m["auc"], cfg.min_auc)))
        sens_lo = ci["sensitivity"][0]
        criteria.append(Criterion("sensitivity_ci_low", sens_lo, f">= {cfg.sensitivity_ci_floor}",
                                  _ge(sens_lo, cfg.sensitivity_ci_floor)))
        criteria.append(Criterion("ece", m["ece"], f"<= {cfg.max_ece}",
                                  m["ece"] is not None and m["ece"] <= cfg.max_ece))
    else:
        criteria.append(Criterion("accuracy_floor", m["accuracy"], f">= {cfg.min_accuracy}",
                                  _ge(m["accuracy"], cfg.min_accuracy)))
    if champion is not None:
        criteria += _versus_champion(settings, champion, evaluation, dataset_dir, inputs)
    criteria += _data_criteria(dataset_dir, challenger.tags.get("split_certificate"))
    promote = all(c.passed for c in criteria)
    failed = [c.name for c in criteria if not c.passed]
    reason = ("all criteria passed" if promote else f"failed: {', '.join(failed)}") + (
        "" if champion is not None else " (no champion: absolute floors only)")
    return GateDecision(settings.registered_model, str(challenger.version),
                        str(champion.version) if champion is not None else None, criteria, promote, reason,
                        inputs=inputs)


def _ge(value: Any, floor: float) -> bool:
    return value is not None and value == value and value >= floor


def _versus_champion(settings: Settings, champion: Any, evaluation: EvalResult, dataset_dir: Path,
                     inputs: dict[str, Any]) -> list[Criterion]:
    cfg, ev = settings.promote, settings.evaluate
    test = evaluation.test
    assert test is not None
    p_champ = rescore(settings, champion, test, dataset_dir)
    patients = test.frame["patient_id"].to_numpy()
    if evaluation.task == "binary":
        thr = float(champion.tags.get("operating_threshold", 0.5))
        inputs["champion_rescored"] = {k: round(v, 4) for k, v in binary_metrics(test.y, p_champ, thr).items()
                                       if v == v}
        delta = paired_delta_auc(test.y, test.proba, p_champ, patients, n_resamples=ev.bootstrap_resamples,
                                 seed=settings.base.seed, level=ev.ci_level)
        name = "delta_auc_ci_low"
    else:
        delta = _paired_delta_accuracy(test.y, test.proba, p_champ, patients, settings)
        name = "delta_accuracy_ci_low"
    inputs["paired_bootstrap"] = delta
    low = delta["ci"][0]
    out = [Criterion(f"{name} (non-inferiority)", round(low, 4), f"> -{cfg.auc_margin}", low > -cfg.auc_margin)]
    if cfg.require_superiority:
        out.append(Criterion(f"{name} (superiority)", round(low, 4), "> 0", low > 0))
    return out


def _paired_delta_accuracy(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, patients: np.ndarray,
                           settings: Settings) -> dict[str, Any]:
    ev = settings.evaluate
    hit_new = (p_new.argmax(1) == y).astype(float)
    hit_old = (p_old.argmax(1) == y).astype(float)
    w = patient_weights(patients, ev.bootstrap_resamples, settings.base.seed)
    deltas = (w @ (hit_new - hit_old)) / w.sum(axis=1)
    alpha = (1 - ev.ci_level) / 2
    return {"delta_accuracy": float(hit_new.mean() - hit_old.mean()),
            "ci": [float(np.quantile(deltas, alpha)), float(np.quantile(deltas, 1 - alpha))],
            "resamples": int(len(deltas))}


def _data_criteria(dataset_dir: Path, trained_on: str | None) -> list[Criterion]:
    """(d) the split certificate verifies, shows zero patient overlap and is the one the model was trained on;
    (e) data validation passed."""
    try:
        cert = verify_certificate(dataset_dir)
        overlap, cert_ok, sha = cert["patient_overlap"], True, cert["certificate_sha256"]
    except (LeakageError, FileNotFoundError):
        overlap, cert_ok, sha = None, False, None
    same = trained_on is None or trained_on == sha
    validation = read_validation(dataset_dir) or {}
    valid = bool(validation) and not validation.get("critical_failures")
    return [
        Criterion("split_patient_overlap", overlap, "== 0 (certificate verified)", cert_ok and overlap == 0),
        Criterion("split_certificate_match", same, "training split == evaluated split", cert_ok and same),
        Criterion("data_validation", valid, "passed", valid),
    ]


# --------------------------------------------------------------------------- promotion


class PromotionError(RuntimeError):
    """An alias move that would break the registry's rules (the message says which)."""


def record_decision(settings: Settings, version: Any, decision: GateDecision, run_id: str) -> None:
    """Store the decision on the version (tags) and in its run (JSON artifact); refresh the model card."""
    client = configure_mlflow(settings)
    name = settings.registered_model
    tags = {"gate_verdict": "pass" if decision.promote else "fail", "gate_failed": ",".join(decision.failed) or "none",
            "gate_decided_at": decision.decided_at, "gate_champion": str(decision.champion_version),
            "gate_reason": decision.reason[:250]}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.log_dict(run_id, decision.to_dict(), f"gate/decision-v{version.version}.json")
    publish_card(settings, version.version)


def load_decision(settings: Settings, version: Any) -> dict[str, Any] | None:
    """The gate decision JSON of a version, or None when it was never gated."""
    import mlflow

    configure_mlflow(settings)
    try:
        return mlflow.artifacts.load_dict(f"runs:/{version.run_id}/gate/decision-v{version.version}.json")
    except Exception:
        return None


def record_approval(settings: Settings, version: Any, approval: dict[str, Any]) -> None:
    """Store a reviewer's decision (or the timeout) on the version and in its run."""
    client = configure_mlflow(settings)
    name = settings.registered_model
    tags = {"approval_status": approval["status"], "approval_reviewer": approval.get("reviewer") or "",
            "approval_comment": (approval.get("comment") or "")[:250], "approval_decided_at": approval["decided_at"]}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.log_dict(version.run_id, approval, f"gate/approval-v{version.version}.json")
    publish_card(settings, version.version)


def approve_version(settings: Settings, version: str, *, reviewer: str, comment: str,
                    approve: bool) -> dict[str, Any]:
    """A reviewer's decision outside Prefect (CLI): record it; on approval move ``champion``.

    Raises:
        PromotionError: the version did not pass the gate.
    """
    client = configure_mlflow(settings)
    mv = client.get_model_version(settings.registered_model, str(version))
    if mv.tags.get("gate_verdict") != "pass":
        raise PromotionError(f"v{version} did not pass the promotion gate (verdict "
                             f"{mv.tags.get('gate_verdict', 'missing')!r}); it cannot be approved")
    record = {"approved": approve, "status": "approved" if approve else "rejected", "reviewer": reviewer,
              "comment": comment, "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "version": str(version)}
    record_approval(settings, mv, record)
    if approve:
        record["aliases"] = move_champion(settings, str(version), reason=f"approved by {reviewer}")
    return record


def check_promotable(settings: Settings, version: str) -> Any:
    """The version, if it may hold ``champion``: gate passed, and approved when approval is required."""
    client = configure_mlflow(settings)
    mv = client.get_model_version(settings.registered_model, str(version))
    if mv.tags.get("gate_verdict") != "pass":
        raise PromotionError(f"{settings.registered_model} v{version} cannot become champion: its gate verdict is "
                             f"{mv.tags.get('gate_verdict', 'missing')!r} (failed: {mv.tags.get('gate_failed', '-')}); "
                             "only versions that passed the promotion gate may be champion")
    if settings.promote.require_approval and mv.tags.get("approval_status") != "approved":
        raise PromotionError(f"{settings.registered_model} v{version} needs a reviewer's approval first "
                             f"(approval_status={mv.tags.get('approval_status', 'missing')!r}); "
                             "approve it in the Prefect UI or set promote.require_approval=false")
    return mv


def move_champion(settings: Settings, version: str, *, reason: str) -> dict[str, str | None]:
    """Point ``champion`` at ``version``; the old champion becomes ``previous-champion``.

    Ordered so an interruption leaves the aliases consistent: ``previous-champion`` moves
    first (to the still-current champion), then ``champion``.

    Raises:
        PromotionError: ``version`` did not pass the gate (or approval, when required).
    """
    client = configure_mlflow(settings)
    name, version = settings.registered_model, str(version)
    check_promotable(settings, version)
    old = get_alias(settings, CHAMPION)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    old_version = str(old.version) if old is not None else None
    if old_version is not None and old_version != version:
        client.set_registered_model_alias(name, PREVIOUS, old_version)
        client.set_model_version_tag(name, version, "previous_champion_version", old_version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "champion_since", now)
    client.set_model_version_tag(name, version, "champion_reason", reason[:250])
    logger.info("%s: champion → v%s (previous: %s)", name, version, old_version)
    publish_card(settings, version)
    return {"champion": version, PREVIOUS: old_version if old_version != version else None}


def rollback(settings: Settings, *, reason: str, actor: str) -> dict[str, Any]:
    """Move ``champion`` back to ``previous-champion``, with an audit record.

    The audit record is stored as tags and a description line on both versions and as a
    JSON artifact (``registry/rollback-<time>.json``) in the rolled-back version's run.
    ``previous-champion`` then points at the champion before the restored one, if known.

    Raises:
        PromotionError: no champion or no previous champion to return to.
    """
    client = configure_mlflow(settings)
    name = settings.registered_model
    current, previous = get_alias(settings, CHAMPION), get_alias(settings, PREVIOUS)
    if current is None or previous is None or previous.version == current.version:
        raise PromotionError(f"{name}: nothing to roll back to (champion={getattr(current, 'version', None)}, "
                             f"previous-champion={getattr(previous, 'version', None)}); "
                             "see `xrayops registry show`")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    record = {"action": "rollback", "model": name, "from_version": str(current.version),
              "to_version": str(previous.version), "reason": reason, "actor": actor, "at": now}
    client.log_dict(current.run_id, record, f"registry/rollback-{now.replace(':', '')}.json")
    before = previous.tags.get("previous_champion_version")
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    if before and before not in (str(previous.version), str(current.version)):
        client.set_registered_model_alias(name, PREVIOUS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    _audit(client, name, current.version, {"rolled_back_at": now, "rolled_back_reason": reason[:250],
                                           "rolled_back_by": actor}, f"Rolled back {now} by {actor}: {reason}")
    _audit(client, name, previous.version, {"champion_since": now, "champion_reason": f"rollback: {reason}"[:250],
                                            "restored_by": actor}, f"Restored as champion {now} by {actor}: {reason}")
    logger.warning("%s: rolled back champion v%s → v%s (%s)", name, current.version, previous.version, reason)
    for v in (current.version, previous.version):
        publish_card(settings, str(v))
    return {**record, "aliases": aliases(settings)}


def _audit(client: Any, name: str, version: str, tags: dict[str, str], line: str) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    description = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"{description}\n\n{line}".strip())


def aliases(settings: Settings) -> dict[str, str]:
    """Alias → version of the registered model (empty when it does not exist)."""
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    try:
        return {k: str(v) for k, v in client.get_registered_model(settings.registered_model).aliases.items()}
    except MlflowException:
        return {}


def overview(settings: Settings) -> list[dict[str, Any]]:
    """One row per version (newest first): aliases, metrics, threshold, gate, approval, exports."""
    client = configure_mlflow(settings)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(settings).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{settings.registered_model}'"):
        t = mv.tags
        rows.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                     "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                     "model": t.get("model_arch"), "auc": t.get("test_auc") or t.get("test_accuracy"),
                     "threshold": t.get("operating_threshold"), "gate": t.get("gate_verdict", "-"),
                     "failed": t.get("gate_failed", "-"), "approval": t.get("approval_status", "-"),
                     "gradcam": t.get("gradcam_sanity", "-"), "onnx": t.get("onnx_export", "-"),
                     "rolled_back": t.get("rolled_back_at", "")})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)
