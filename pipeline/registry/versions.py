"""Stages ``register`` + ``promote``: registry versions, alias moves, approval records, rollback.

Every evaluated model becomes a new version with lineage tags, exports (SavedModel + ONNX,
parity-checked), a model card and alias ``challenger``. Whether it may become ``champion`` is
decided by :mod:`pipeline.registry.gate`; ``champion`` only ever points at a version whose gate verdict
is ``pass`` (and that a reviewer approved when ``promote.require_approval``). Alias moves are
ordered so an interruption leaves them consistent: ``previous-champion`` is set to the old
champion *before* ``champion`` moves. Every move and rollback is recorded on the versions.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings
from pipeline.evaluation.evaluate import EvalResult
from pipeline.training.inputs import InputSpec, check_files, load_images
from pipeline.tracking import code_version, configure_mlflow, mlflow_client
from pipeline.training.train import TrainResult
from pipeline.errors import PromotionError  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from pipeline.registry.gate import GateDecision

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


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
    from pipeline.registry.modelcard import publish_model_card

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
    from pipeline.registry.export import log_exports

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
    """The version holding ``alias``, or None (a read: MLflow's process-wide URIs are left alone)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(settings)
    try:
        return client.get_model_version_by_alias(settings.registered_model, alias)
    except MlflowException:
        return None


def load_version_model(settings: Settings, version: Any) -> Any:
    """Load the Keras model of a registry version."""
    import mlflow

    from pipeline.training.models.zoo import register_custom_objects

    register_custom_objects()
    configure_mlflow(settings)
    return mlflow.keras.load_model(f"models:/{settings.registered_model}/{version.version}")


# --------------------------------------------------------------------------- promotion


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

    The audit record is stored as tags, a description line and a JSON artifact
    (``registry/rollback-<time>.json`` in the training run) on both versions.
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
    for run_id in {current.run_id, previous.run_id}:
        client.log_dict(run_id, record, f"registry/rollback-{now.replace(':', '')}.json")
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


def gate(settings: Settings, challenger: Any, evaluation: EvalResult, dataset_dir: Path | None = None) -> GateDecision:
    """Run the promotion gate (see :func:`pipeline.registry.gate.gate`)."""
    from pipeline.registry.gate import gate as run_gate

    return run_gate(settings, challenger, evaluation, dataset_dir)
