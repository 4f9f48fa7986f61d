"""Evidence pack per registry version: what a review board reads, mapped to CLAIM 2024 and TRIPOD+AI.

Standards: CLAIM 2024 update (Tejani et al., Radiology: Artificial Intelligence 2024;6(4):e240300,
doi:10.1148/ryai.240300; 44 items, numbered differently from CLAIM 2020) and TRIPOD+AI (Collins et
al., BMJ 2024;385:e078378, doi:10.1136/bmj-2023-078378; 27 items). How the item numbers were
verified, and which items are left to the study team, is in :mod:`pipeline.registry.evidence_report`.

The pack is read back from what the pipeline recorded (the version's tags, its training run's
artifacts, the dataset folder's ingest summary, split and certificate, the audit log), like the
model card, so it can be regenerated at any time (``xrayops registry evidence N``). It holds
aggregate values and de-identified ids only: counts per split and category, metrics, hashes,
setting values (URIs masked). Files: ``<reports_dir>/evidence/<model>-v<N>/evidence.{json,html}``,
also logged to the run (``evidence/v<N>/``), linked from the version description, a version tag
and the model card. The checklist table, the change envelope and the diff against the champion's
pack are :mod:`pipeline.registry.evidence_report`.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import audit
from pipeline.config import Settings
from pipeline.connections import mask_uri
from pipeline.data.dicom import SAFE_FIELDS
from pipeline.data.image_store import PNG_KEEP
from pipeline.data.manifest import MANIFEST_FILE, SUMMARY_FILE
from pipeline.data.split import CERTIFICATE_FILE, SPLIT_FILE, SPLITS
from pipeline.errors import RegistryError
from pipeline.registry.contract import (
    CHAMPION,
    DECISION_CURVE_ARTIFACT,
    EVALUATION_ARTIFACT,
    EVALUATION_DIR,
    EXPLAIN_ARTIFACT,
    FAILURE_ANALYSIS_ARTIFACT,
    GATE_DIR,
    MODEL_CARD_DIR,
    OPERATING_POINT_ARTIFACT,
    PLOTS_DIR,
    RELIABILITY_ARTIFACT,
    SUBGROUPS_ARTIFACT,
    EvidenceTags,
    VersionRecord,
    approval_artifact,
    card_path,
    decision_artifact,
    evidence_artifact,
    evidence_path,
    run_uri,
)
from pipeline.registry.evidence_report import change_envelope, checklist, diff_packs, render_html
from pipeline.registry.read import get_alias, get_version, load_decision, load_evaluation
from pipeline.tracking import configure_mlflow, mask_secrets

logger = logging.getLogger(__name__)

SCHEMA = "xrayops-evidence/1"
MARKER = "Evidence pack:"
DEMOGRAPHIC_COLUMNS = ("sex", "age_band", "site", "view_position", "manufacturer", "label")
PACKAGES = ("tensorflow", "keras", "numpy", "scikit-learn", "mlflow", "prefect", "pydicom", "great-expectations",
            "evidently", "dvc", "onnxruntime", "pandas", "pillow")
RUN_DIRS = (EVALUATION_DIR, PLOTS_DIR, GATE_DIR, MODEL_CARD_DIR)


@dataclass
class Sources:
    """What one pack is built from (read once)."""

    settings: Settings
    record: VersionRecord
    evaluation: dict[str, Any]
    summary: dict[str, Any]
    certificate: dict[str, Any]
    decision: dict[str, Any] | None
    run_artifacts: set[str]
    run_params: dict[str, str]
    dataset_dir: Path


# --------------------------------------------------------------------------- gathering


def gather(settings: Settings, version: Any, dataset_dir: Path | None = None) -> Sources:
    """Read the version, its run's evaluation, gate decision and artifact list, and the dataset files.

    Raises:
        RegistryError: no such version, or its run has no evaluation (a pack without numbers would mislead).
    """
    dataset_dir = dataset_dir or settings.dataset_dir
    mv = get_version(settings, version)
    record = VersionRecord.from_version(mv)
    if record.run_id is None:
        raise RegistryError(f"{settings.registered_model} v{record.version} has no training run: no evidence to "
                            "pack (register it with `xrayops promote`)")
    client = configure_mlflow(settings)
    listed = {a.path for d in RUN_DIRS for a in client.list_artifacts(record.run_id, d)}
    run = client.get_run(record.run_id)
    return Sources(settings, record, load_evaluation(settings, mv), _read_json(dataset_dir / SUMMARY_FILE),
                   _read_json(dataset_dir / CERTIFICATE_FILE), load_decision(settings, mv), listed,
                   dict(run.data.params), dataset_dir)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- sections


def build_pack(settings: Settings, version: Any, dataset_dir: Path | None = None, *,
               with_diff: bool = True) -> dict[str, Any]:
    """The pack of ``version`` as a JSON-able dict (sections, checklist, change envelope, diff)."""
    s = gather(settings, version, dataset_dir)
    v = s.record.version
    sections = {"provenance": provenance(s), "deidentification": deidentification(s), "flow": flow(s),
                "leakage": leakage(s), "demographics": demographics(s.dataset_dir), "model": model(s),
                "training": training(s), "metrics": metrics(s), "subgroups": subgroups(s),
                "calibration": calibration(s), "failure_analysis": failure_analysis(s),
                "explanations": explanations(s), "software": software(s), "threshold": threshold(s),
                "gate": gate(s), "approval": approval(s), "audit": audit_excerpt(settings, v),
                "model_card": {"file": str(card_path(settings, v))}}
    pack: dict[str, Any] = {
        "schema": SCHEMA, "model": settings.registered_model, "version": v, "run_id": s.record.run_id,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {"json": str(evidence_path(settings, v, "json")), "html": str(evidence_path(settings, v, "html"))},
        "run_artifacts": {"json": evidence_artifact(v, "json"), "html": evidence_artifact(v, "html")},
        "sections": sections}
    pack["change_envelope"] = change_envelope(settings, sections)
    pack["diff"] = _diff(settings, pack, s, dataset_dir) if with_diff else None
    pack["items"] = checklist({**sections, "change_envelope": pack["change_envelope"], "diff": pack["diff"]},
                              _links(s))
    return mask_secrets(pack)


def _links(s: Sources) -> dict[str, list[dict[str, str]]]:
    """Section → the artefacts that hold it: files on this machine, run artifacts that exist, code modules."""
    run, v = s.record.run_id or "", s.record.version
    card = str(card_path(s.settings, v))

    def mlflow(*paths: str) -> list[dict[str, str]]:
        return [{"kind": "mlflow", "run_id": run, "path": p, "uri": run_uri(run, p)} for p in paths
                if p in s.run_artifacts]

    def files(*names: str) -> list[dict[str, str]]:
        return [{"kind": "file", "path": str(s.dataset_dir / n)} for n in names if (s.dataset_dir / n).is_file()]

    def code(*modules: str) -> list[dict[str, str]]:
        return [{"kind": "code", "path": m} for m in modules]

    return {
        "provenance": files(SUMMARY_FILE, MANIFEST_FILE),
        "deidentification": code("pipeline.data.deid", "pipeline.data.image_store", "pipeline.data.dicom"),
        "flow": files(SUMMARY_FILE, CERTIFICATE_FILE), "leakage": files(CERTIFICATE_FILE, SPLIT_FILE),
        "demographics": files(MANIFEST_FILE, SPLIT_FILE), "model": code("pipeline.training.models"),
        "training": code("pipeline.training.train"), "metrics": mlflow(EVALUATION_ARTIFACT),
        "subgroups": mlflow(SUBGROUPS_ARTIFACT), "calibration": mlflow(RELIABILITY_ARTIFACT, DECISION_CURVE_ARTIFACT),
        "failure_analysis": mlflow(FAILURE_ANALYSIS_ARTIFACT), "explanations": mlflow(EXPLAIN_ARTIFACT),
        "software": code("pipeline.tracking"), "threshold": mlflow(OPERATING_POINT_ARTIFACT),
        "gate": mlflow(decision_artifact(v)), "approval": mlflow(approval_artifact(v)),
        "audit": [{"kind": "file", "path": str(s.settings.audit_log)}] if s.settings.audit_log.is_file() else [],
        "model_card": [{"kind": "file", "path": card}] if Path(card).is_file() else []}


def provenance(s: Sources) -> dict[str, Any]:
    t, m = s.record.lineage, s.summary
    keys = ("source", "dataset_hash", "dvc_md5", "dvc_rev", "manifest_sha256", "content_sha256", "files_found",
            "ingested", "patients", "classes", "label_counts", "profile_modality")
    return {"dataset": t.dataset, "version_dvc_md5": t.dvc_md5, "version_dvc_rev": t.dvc_rev,
            "data_source_setting": s.settings.data.source, "summary_available": bool(m),
            **{k: m.get(k) for k in keys if k in m},
            "matches_version": bool(m) and (m.get("dvc_md5") or None) == t.dvc_md5}


def deidentification(s: Sources) -> dict[str, Any]:
    return {
        "patient_ids": "pseudonymised at ingestion: HMAC-SHA256 with a secret salt (>= 32 bytes) from the "
                       f"environment variable {s.settings.data.ingest.salt_env} or a machine-local secret file; "
                       "the salt is never logged or stored with the data",
        "header_fields_kept": sorted(SAFE_FIELDS.values()),
        "header_policy": "DICOM: only the whitelisted fields leave the reader (names, dates, accession numbers, "
                         "institutions, physicians, free text and private tags are dropped); pixels re-encoded as PNG",
        "image_store": "files renamed by content hash; PNG chunks kept: "
                       + ", ".join(sorted(c.decode() for c in PNG_KEEP))
                       + "; JPEG with metadata re-encoded; nothing after the end of the image",
        "identifiers_in_pack": "none: aggregate counts and de-identified image ids only"}


def flow(s: Sources) -> dict[str, Any]:
    """Inclusion/exclusion counts, files found → ingested → split (CLAIM 2024 item 35, TRIPOD+AI 20a)."""
    m, cert = s.summary, s.certificate
    if not m:
        return {}
    policy = {k: int(v) for k, v in (m.get("excluded_by_policy") or {}).items()}
    quarantined = {k: int(v) for k, v in (m.get("quarantine_reasons") or {}).items()}
    split = {k: int(v) for k, v in (cert.get("images") or {}).items()}
    ingested = int(m.get("ingested", 0))
    return {"files_found": int(m.get("files_found", m.get("files_seen", 0))),
            "excluded_by_label_mapping": int(m.get("excluded_by_label_mapping", 0)),
            "excluded_by_policy": policy, "quarantined": quarantined, "ingested": ingested,
            "split_images": split, "split_patients": dict(cert.get("patients") or {}),
            "dropped_at_split": ingested - sum(split.values()) if split else None}


def leakage(s: Sources) -> dict[str, Any]:
    cert = s.certificate
    if not cert:
        return {}
    keys = ("method", "fractions", "seed", "patient_overlap", "near_duplicate_action", "certificate_sha256",
            "manifest_sha256", "patients_total")
    return {**{k: cert.get(k) for k in keys},
            "exact_duplicates_across_splits": len(cert.get("exact_duplicates_across_splits") or []),
            "near_duplicates_across_splits": len(cert.get("near_duplicates_across_splits") or []),
            "matches_version": cert.get("certificate_sha256") == s.record.lineage.split_certificate,
            "gate_checks": {c["name"]: c["passed"] for c in (s.decision or {}).get("criteria", [])
                            if c["name"] in ("split_certificate", "patient_overlap", "split_matches",
                                             "split_manifest")}}


def demographics(dataset_dir: Path) -> dict[str, Any]:
    """Images and patients per split, and image counts per split of sex, age band, site, view, manufacturer,
    label (aggregate counts only; missing values are ``unknown``)."""
    import pandas as pd
    import pyarrow.parquet as pq

    manifest, split = dataset_dir / MANIFEST_FILE, dataset_dir / SPLIT_FILE
    if not (manifest.is_file() and split.is_file()):
        return {}
    names = set(pq.read_schema(manifest).names)
    frame = pd.read_parquet(manifest, columns=[c for c in ("image_id", *DEMOGRAPHIC_COLUMNS) if c in names])
    table = pd.read_parquet(split, columns=["image_id", "patient_id", "split"]).merge(frame, on="image_id")
    out: dict[str, Any] = {"images": {s: int((table["split"] == s).sum()) for s in SPLITS},
                           "patients": {s: int(table.loc[table["split"] == s, "patient_id"].nunique())
                                        for s in SPLITS}, "by": {}}
    for col in DEMOGRAPHIC_COLUMNS:
        if col not in table:
            continue
        counts = table.assign(**{col: table[col].fillna("unknown").astype(str)}).groupby([col, "split"]).size()
        out["by"][col] = {str(value): {s: int(counts.get((value, s), 0)) for s in SPLITS}
                          for value in sorted({k[0] for k in counts.index})}
    return out


def model(s: Sources) -> dict[str, Any]:
    t, e = s.record.lineage, s.record.export
    return {"architecture": t.model_arch, "input": [t.input_size, t.input_size, t.input_channels],
            "classes": t.classes, "positive_class": t.positive_class, "task": t.task,
            "output": "probability of the positive class; label at the locked threshold" if t.task == "binary"
            else "class probabilities; arg-max", "saved_model": e.saved_model, "onnx": e.onnx,
            "onnx_parity_max_abs_diff": e.onnx_parity}


def training(s: Sources) -> dict[str, Any]:
    t = s.record.lineage
    params = {k: v for k, v in s.run_params.items() if k.startswith(("train.", "split.", "base."))}
    return {"seed": t.seed, "git_commit": t.git_commit, "git_dirty": t.git_dirty, "lock_sha256": t.lock_sha256,
            "run_id": s.record.run_id, "params": dict(sorted(params.items()))}


def metrics(s: Sources) -> dict[str, Any]:
    e = s.evaluation
    values = {k: v for k, v in (e.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return {"n_test": e.get("n_test"), "values": values, "ci": e.get("ci") or {},
            "confusion": (e.get("metrics") or {}).get("confusion")} if values else {}


def subgroups(s: Sources) -> dict[str, Any]:
    table = s.evaluation.get("subgroups") or {}
    rows = [{"attribute": r["attribute"], "group": r["group"], "patients": r["patients"], "images": r["images"],
             "metrics": r.get("metrics") or {}, "ci": r.get("ci") or {}} for r in table.get("groups") or []]
    return {"min_patients": table.get("min_patients"), "groups": rows} if rows else {}


def calibration(s: Sources) -> dict[str, Any]:
    m, ci = s.evaluation.get("metrics") or {}, s.evaluation.get("ci") or {}
    keys = [k for k in ("ece", "brier", "calibration_slope", "calibration_intercept") if m.get(k) is not None]
    curve = (s.evaluation.get("decision_curve") or {}).get("operating_point")
    return ({**{k: m[k] for k in keys}, "ci": {k: ci.get(k) for k in keys},
             "net_benefit_at_threshold": (curve or {}).get("net_benefit")} if keys else {})


def failure_analysis(s: Sources) -> dict[str, Any]:
    f = s.evaluation.get("failure_analysis") or {}
    if not f:
        return {}
    shortcut = f.get("shortcut") or {}
    return {"overall": f.get("overall"), "highest_fp_rate": f.get("highest_fp_rate"),
            "highest_fn_rate": f.get("highest_fn_rate"),
            "shortcut": {"status": shortcut.get("status"), "flagged": shortcut.get("flagged"),
                         "alert_drop": shortcut.get("alert_drop")}}


def explanations(s: Sources) -> dict[str, Any]:
    ex = s.evaluation.get("explain") or {}
    methods = ex.get("methods") or {}
    if not methods:
        return {"status": ex.get("status", "not_run")} if ex else {}
    return {"status": ex.get("status"), "methods": {
        name: {"status": m.get("status"), "sanity_rank_corr": (m.get("sanity") or {}).get("rank_corr"),
               "sanity_threshold": (m.get("sanity") or {}).get("threshold"), "lung_mass": m.get("lung_mass")}
        for name, m in methods.items()}}


def software(s: Sources) -> dict[str, Any]:
    """Library versions of the environment that generated the pack, beside the training run's code version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    def installed(name: str) -> str | None:
        try:
            return package_version(name)
        except PackageNotFoundError:
            return None

    t = s.record.lineage
    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "packages": {p: installed(p) for p in PACKAGES},
            "code": {"git_commit": t.git_commit, "git_dirty": t.git_dirty, "uv_lock_sha256": t.lock_sha256}}


def threshold(s: Sources) -> dict[str, Any]:
    op = s.evaluation.get("operating_point") or {}
    keys = ("threshold", "policy", "reason", "criterion", "parameters", "derived_on", "validation_images",
            "validation_patients", "validation_positives", "val_sensitivity", "val_specificity")
    return {k: op.get(k) for k in keys if k in op}


def gate(s: Sources) -> dict[str, Any]:
    d = s.decision
    if not d:
        return {}
    return {"promote": d.get("promote"), "reason": d.get("reason"), "champion_version": d.get("champion_version"),
            "decided_at": d.get("decided_at"), "criteria": d.get("criteria")}


def approval(s: Sources) -> dict[str, Any]:
    a = s.record.approval
    required = s.settings.promote.require_approval
    if a is None:
        return {"required": required, "status": "none"}
    return {"required": required, "status": a.status, "reviewer": a.reviewer, "comment": a.comment,
            "decided_at": a.decided_at}


def audit_excerpt(settings: Settings, version: str) -> dict[str, Any]:
    """The audit records of this model version and the chain's verdict and head hash now."""
    log = audit.AuditLog.of(settings)
    if not log.path.is_file():
        return {}
    verdict = log.verify()
    mine = [r for r in log.records() if r.get("model") == settings.registered_model
            and str(r.get("version")) == str(version)]
    return {"log": str(log.path), "chain_ok": verdict.ok, "records_total": verdict.records,
            "head_hash": verdict.last_hash, "problem": verdict.problem,
            "records": [{k: r.get(k) for k in ("seq", "time", "actor", "action", "details", "hash")} for r in mine]}


# --------------------------------------------------------------------------- diff + publishing


def _diff(settings: Settings, pack: dict[str, Any], s: Sources, dataset_dir: Path | None) -> dict[str, Any] | None:
    """Against the champion the gate compared this version with, else the current champion (not itself)."""
    against = (s.decision or {}).get("champion_version")
    if against is None:
        current = get_alias(settings, CHAMPION)
        against = str(current.version) if current is not None else None
    if against is None or str(against) == s.record.version:
        return None
    path = evidence_path(settings, against, "json")
    other = json.loads(path.read_text()) if path.is_file() else None
    if other is None or other.get("schema") != SCHEMA:
        try:
            other = build_pack(settings, against, dataset_dir, with_diff=False)
        except RegistryError as exc:
            return {"champion_version": str(against), "unavailable": str(exc)}
    return diff_packs(pack, other)


def publish_evidence(settings: Settings, version: Any, dataset_dir: Path | None = None) -> Path:
    """(Re)write the pack of ``version``: JSON + HTML files, run artifacts, a version tag and a description link.

    Returns:
        The HTML file.
    """
    client = configure_mlflow(settings)
    pack = build_pack(settings, version, dataset_dir)
    v, run_id = pack["version"], pack["run_id"]
    html = render_html(pack)
    json_path, html_path = evidence_path(settings, v, "json"), evidence_path(settings, v, "html")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(pack, indent=2, sort_keys=True, default=str))
    html_path.write_text(html)
    client.log_artifact(run_id, str(json_path), str(Path(evidence_artifact(v, "json")).parent))
    client.log_artifact(run_id, str(html_path), str(Path(evidence_artifact(v, "html")).parent))
    uri = run_uri(run_id, evidence_artifact(v, "html"))
    for key, value in EvidenceTags(html_uri=uri).to_tags().items():
        client.set_model_version_tag(settings.registered_model, v, key, value)
    mv = client.get_model_version(settings.registered_model, v)
    kept = [line for line in (mv.description or "").splitlines() if not line.startswith(MARKER)]
    link = f"{MARKER} `{uri}` (file `{mask_uri(str(html_path))}`)"
    client.update_model_version(settings.registered_model, v,
                                description="\n".join([*[k for k in kept if k.strip()], "", link]).strip())
    logger.info("evidence pack of %s v%s: %s", settings.registered_model, v, html_path)
    return html_path
