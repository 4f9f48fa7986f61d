"""Composite steps of the main job that sit between stages (library code, no orchestration).

- the reference profile logged with a trained model (for drift monitoring);
- simulated production traffic (its own log, ``paths.simulation_log``) + drift report (the embedded
  default's monitoring demo);
- the end-of-run summary whose keys are a stable contract (see README "Run summary").
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.connections import mask_uri
from pipeline.tracking import mask_secrets

logger = logging.getLogger(__name__)

SUMMARY_SCHEMA = "xrayops.run-summary/1"
REFERENCE_MAX_ROWS = 5000


def log_reference_profile(settings: Settings, trained: Any, evaluation: Any) -> None:
    """Score training+validation images; log their features, embedding PCs and outputs with the run.

    The embedding PCA is fitted on the training split only and logged next to the profile
    (``reference/embedding_pca.npz``): serving projects production embeddings with it, so the
    reference and the production log carry the same ``emb_pc*`` columns.
    """
    from pipeline.data.manifest import read_manifest
    from pipeline.data.split import read_split
    from pipeline.monitoring.drift import log_reference, reference_profile
    from pipeline.serving.predictor import fit_pca, score_with_embeddings
    from pipeline.training.inputs import InputSpec, check_files, load_images

    dataset_dir = settings.dataset_dir
    manifest, split = read_manifest(dataset_dir), read_split(dataset_dir)
    split = split.loc[split["split"].isin(["train", "val"]), ["image_id", "split"]]
    frame = manifest.merge(split, on="image_id").sort_values("image_id").reset_index(drop=True)
    if len(frame) > REFERENCE_MAX_ROWS:
        frame = frame.sample(REFERENCE_MAX_ROWS, random_state=settings.base.seed).reset_index(drop=True)
    images = load_images(check_files(dataset_dir, frame["path"].tolist()), InputSpec(**trained.input))
    proba, emb, layer = score_with_embeddings(trained.model, images)
    is_train = (frame["split"] == "train").to_numpy()
    pca = fit_pca(emb[is_train] if is_train.sum() > 1 else emb, settings.monitor.embedding_components, layer)
    threshold = evaluation.operating_point["threshold"] if evaluation.operating_point else None
    log_reference(settings, trained.run_id, reference_profile(frame, proba, threshold, pca.transform(emb)), pca)
    logger.info("reference profile: %d images, %d embedding PCs of layer %s (%.0f%% of variance)", len(frame),
                len(pca.components), layer, 100 * float(pca.explained_variance_ratio.sum()))


def simulate_and_report(settings: Settings) -> dict[str, Any]:
    """Simulate a shifted production batch against the champion, log it, and report drift.

    The batch goes to the simulation log (``paths.simulation_log``) and the report reads that
    log only: the production log and the monitoring of real traffic never see simulated rows.
    """
    from pipeline.data.manifest import read_manifest
    from pipeline.data.split import read_split
    from pipeline.monitoring.drift import monitor_champion, write_summary
    from pipeline.monitoring.simulate import simulate_requests, simulation_log_dir
    from pipeline.monitoring.workspace import record_monitoring_run
    from pipeline.registry.contract import CHAMPION
    from pipeline.registry.read import get_alias
    from pipeline.serving import production_log
    from pipeline.serving.predictor import load_predictor

    champion = get_alias(settings, CHAMPION)
    if champion is None:
        logger.warning("no champion yet: skipping production simulation and drift report")
        return {"status": "no_champion"}
    log_dir = simulation_log_dir(settings)  # before scoring: a misconfigured log fails at once
    predictor = load_predictor(settings, champion, alias=CHAMPION)
    manifest, split = read_manifest(settings.dataset_dir), read_split(settings.dataset_dir)
    test_ids = set(split.loc[split["split"] == "test", "image_id"])
    paths = [settings.dataset_dir / p for p in manifest.loc[manifest["image_id"].isin(test_ids), "path"]]
    rows = simulate_requests(paths, predictor, n=settings.monitor.simulate_rows,
                             shift=settings.monitor.simulate_shift, seed=settings.base.seed + 1,
                             shifted_fraction=settings.monitor.simulate_shifted_fraction)
    production_log.append(log_dir, rows)
    summary = monitor_champion(settings, last_k=settings.monitor.simulate_rows, alias=CHAMPION, traffic="simulation")
    if summary.get("status") != "no_model":  # the demo's point on the timeline, in its own "simulated" project
        recorded = record_monitoring_run(settings, summary)
        summary["workspace"] = {k: recorded[k] for k in ("path", "project_id", "snapshot_id")}
        write_summary(Path(summary["report_dir"]), summary)
    return summary


def run_summary(settings: Settings, *, started: datetime, ingest: dict[str, Any], validation: dict[str, Any],
                certificate: dict[str, Any], trained: Any, evaluation: Any, version: Any, decision: Any,
                promotion: dict[str, Any], drift: dict[str, Any] | None) -> dict[str, Any]:
    """The end-of-run summary (stable keys; documented in README.md); passwords in URIs are masked."""
    from pipeline.registry.read import aliases

    finished = datetime.now(UTC)
    dvc = ingest.get("dvc") or {}
    metrics = {k: v for k, v in evaluation.metrics.items() if k != "confusion"}
    return mask_secrets({
        "schema": SUMMARY_SCHEMA,
        "status": "completed",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "wall_seconds": round((finished - started).total_seconds(), 1),
        "data": {
            "source": settings.data.source,
            "dataset": settings.dataset_name,
            "dataset_dir": str(settings.dataset_dir),
            "dvc_md5": dvc.get("dvc_md5"),
            "dvc_rev": dvc.get("rev"),
            "files_seen": ingest["files_seen"],
            "ingested": ingest["ingested"],
            "quarantined": ingest["quarantined"],
            "excluded_by_policy": ingest.get("excluded_by_policy", {}),
            "patients": ingest["patients"],
            "validation_success": not validation["critical_failures"],
            "split": {"images": certificate["images"], "patients": certificate["patients"],
                      "patient_overlap": certificate["patient_overlap"],
                      "certificate_sha256": certificate["certificate_sha256"]},
        },
        "train": {"model": trained.model_name, "run_id": trained.run_id, "experiment": settings.experiment_name,
                  "experiment_id": trained.experiment_id,
                  "epochs": trained.epochs_run, "seconds": trained.seconds, "hardware": trained.hardware},
        "metrics": {**metrics, "ci": evaluation.ci,
                    "operating_threshold": (evaluation.operating_point or {}).get("threshold")},
        "registry": {
            "model_name": settings.registered_model,
            "version": str(version.version),
            "aliases": aliases(settings),
            "promoted": bool(promotion.get("promoted")),
            "gate": {"promote": decision.promote, "reason": decision.reason, "failed": decision.failed,
                     # ΔAUC (or Δaccuracy) vs the champion, paired patient bootstrap; None: no champion to compare
                     "versus_champion": decision.inputs.get("paired_bootstrap")},
        },
        "drift": None if drift is None else {k: drift.get(k) for k in ("status", "drift_share", "drift_detected",
                                                                        "drifted_columns", "current_rows")},
        "reports": {
            "drift_html": (drift or {}).get("report_html"),
            "data_docs": validation.get("data_docs"),
            "split_certificate": str(settings.dataset_dir / "split_certificate.json"),
            "metrics": str(settings.model_dir / "metrics.json"),
        },
        "tracking_uri": mask_uri(settings.tracking_uri),
        "mlflow_ui": mlflow_ui_command(settings),
    })


def mlflow_ui_command(settings: Settings) -> str:
    """The command that opens the MLflow UI on the tracking store (a password in the URI masked: fill it in)."""
    return f"uv run mlflow ui --backend-store-uri {mask_uri(settings.tracking_uri)} --port 5000"
