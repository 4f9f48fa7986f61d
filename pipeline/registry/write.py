"""Writing the registry: new versions, gate decisions, approvals, alias moves, rollback.

Every evaluated model becomes a new version with lineage tags, exports (SavedModel + ONNX,
parity-checked), a model card and alias ``challenger``. ``champion`` only ever points at a
version whose gate verdict is ``pass`` (and that a reviewer approved when
``promote.require_approval``): :func:`move_champion` refuses anything else. Alias moves are
ordered so an interruption leaves them consistent: ``previous-champion`` is set to the old
champion *before* ``champion`` moves. Every move and rollback is recorded on the versions.
Tag keys and artifact paths are :mod:`pipeline.registry.contract`'s.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings
from pipeline.errors import PromotionError
from pipeline.evaluation.evaluate import EvalResult
from pipeline.registry.contract import (
    APPROVAL,
    CHALLENGER,
    CHAMPION,
    GATE,
    PREVIOUS,
    ApprovalTags,
    ChampionTags,
    ExportTags,
    GateTags,
    MetricTag,
    RollbackTags,
    VersionRecord,
    VersionTags,
    approval_artifact,
    decision_artifact,
    rollback_artifact,
)
from pipeline.registry.read import aliases, get_alias, version_record
from pipeline.tracking import code_version, configure_mlflow
from pipeline.training.inputs import InputSpec, check_files, load_images
from pipeline.training.train import TrainResult

if TYPE_CHECKING:
    from pipeline.registry.decision import GateDecision

logger = logging.getLogger(__name__)


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
    tags = version_tags(settings, trained, evaluation).to_tags()
    # a LoggedModel source (models:/m-<id>) must name its model_id, or an MLflow *server* rejects it
    model_id = trained.model_uri.removeprefix("models:/") if trained.model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, source=trained.model_uri, run_id=trained.run_id, tags=tags,
                                     description=describe(trained, evaluation), model_id=model_id)
    _wait_ready(client, name, mv.version)
    _set_tags(client, name, mv.version, export_tags(settings, trained, evaluation))
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


def _set_tags(client: Any, name: str, version: Any, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def export_tags(settings: Settings, trained: TrainResult, evaluation: EvalResult,
                n_sample: int = 8) -> dict[str, str]:
    """Log SavedModel + ONNX exports to the training run; the parity result as version tags."""
    from pipeline.registry.export import log_exports

    test = evaluation.test
    if trained.model is None or test is None or test.frame.empty:
        logger.warning("no in-memory model or test images: skipping export")
        return ExportTags(saved_model=ExportTags.SKIPPED).to_tags()
    paths = test.frame["path"].tolist()[:n_sample]
    sample = load_images(check_files(settings.dataset_dir, paths), InputSpec(**trained.input))
    return log_exports(trained.model, trained.run_id, sample, onnx=settings.promote.export_onnx)


def version_tags(settings: Settings, trained: TrainResult, evaluation: EvalResult) -> VersionTags:
    """Lineage and headline tags of a registry version (no patient data)."""
    code = code_version(settings.root)
    explain = evaluation.explain or {}
    op = evaluation.operating_point
    metrics = {}
    for key in ("auc", "sensitivity", "specificity", "accuracy", "macro_f1", "ece"):
        if evaluation.metrics.get(key) is not None:
            lo, hi = evaluation.ci.get(key, [None, None])
            metrics[key] = MetricTag(evaluation.metrics[key], (lo, hi))
    return VersionTags(
        git_commit=code.get("git_commit"), git_dirty=code.get("git_dirty"), lock_sha256=code.get("lock_sha256"),
        seed=settings.base.seed, dataset=trained.dataset.get("name"), dvc_md5=trained.dataset.get("dvc_md5"),
        dvc_rev=trained.dataset.get("dvc_rev"), split_certificate=trained.dataset.get("split_certificate"),
        model_arch=trained.model_name, input_size=trained.input["image_size"],
        input_channels=trained.input["channels"], classes=list(trained.classes),
        positive_class=trained.positive_class, task=evaluation.task,
        operating_threshold=op["threshold"] if op else None, threshold_policy=op["policy"] if op else None,
        gradcam_sanity=str(explain.get("status", "not_run")),
        gradcam_sanity_rank_corr=(explain.get("sanity") or {}).get("rank_corr"), test_metrics=metrics)


def describe(trained: TrainResult, evaluation: EvalResult) -> str:
    m, ci = evaluation.metrics, evaluation.ci
    parts = [f"{trained.model_name} on {trained.dataset.get('name')} (DVC {str(trained.dataset.get('dvc_md5'))[:12]})"]
    for key in ("auc", "sensitivity", "specificity", "accuracy"):
        if m.get(key) is not None and key in ci:
            parts.append(f"{key} {m[key]:.3f} (95% CI {ci[key][0]:.3f}-{ci[key][1]:.3f})")
    op = evaluation.operating_point
    if op:
        parts.append(f"threshold {op['threshold']:.4f} ({op['policy']})")
    return "; ".join(parts)


# --------------------------------------------------------------------------- gate + approval records


def record_decision(settings: Settings, version: Any, decision: GateDecision, run_id: str) -> None:
    """Store the decision on the version (tags) and in its run (JSON artifact); refresh the model card."""
    client = configure_mlflow(settings)
    tags = GateTags.of(promote=decision.promote, failed=decision.failed, decided_at=decision.decided_at,
                       champion=decision.champion_version, reason=decision.reason)
    _set_tags(client, settings.registered_model, version.version, tags.to_tags())
    client.log_dict(run_id, decision.to_dict(), decision_artifact(version.version))
    publish_card(settings, version.version)


def record_approval(settings: Settings, version: Any, approval: dict[str, Any]) -> None:
    """Store a reviewer's decision (``ApprovalRecord.to_dict()``, or the timeout) on the version and in its run."""
    client = configure_mlflow(settings)
    _set_tags(client, settings.registered_model, version.version, ApprovalTags.of(approval).to_tags())
    client.log_dict(version.run_id, approval, approval_artifact(version.version))
    publish_card(settings, version.version)


# --------------------------------------------------------------------------- aliases


def check_promotable(settings: Settings, version: str) -> Any:
    """The version, if it may hold ``champion``: gate passed, and approved when approval is required.

    Raises:
        PromotionError: it may not (the message says why and what to do).
    """
    record = version_record(settings, version)
    blocker = record.champion_blocker(require_approval=settings.promote.require_approval)
    if blocker == GATE:
        raise PromotionError(f"{settings.registered_model} v{version} cannot become champion: its gate verdict is "
                             f"{_verdict(record)!r} (failed: {record.gate.failed_text if record.gate else '-'}); "
                             "only versions that passed the promotion gate may be champion")
    if blocker == APPROVAL:
        status = record.approval.status if record.approval else "missing"
        raise PromotionError(f"{settings.registered_model} v{version} needs a reviewer's approval first "
                             f"(approval_status={status!r}); "
                             "approve it in the Prefect UI or set promote.require_approval=false")
    return record


def _verdict(record: VersionRecord) -> str:
    return record.gate.verdict if record.gate else "missing"


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
        _set_tags(client, name, version, ChampionTags(previous_version=old_version).to_tags())
    client.set_registered_model_alias(name, CHAMPION, version)
    _set_tags(client, name, version, ChampionTags(since=now, reason=reason).to_tags())
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
        client.log_dict(run_id, record, rollback_artifact(now))
    before = VersionRecord.from_version(previous).champion.previous_version
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    if before and before not in (str(previous.version), str(current.version)):
        client.set_registered_model_alias(name, PREVIOUS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    _audit(client, name, current.version, RollbackTags(at=now, reason=reason, by=actor).to_tags(),
           f"Rolled back {now} by {actor}: {reason}")
    _audit(client, name, previous.version,
           ChampionTags(since=now, reason=f"rollback: {reason}", restored_by=actor).to_tags(),
           f"Restored as champion {now} by {actor}: {reason}")
    logger.warning("%s: rolled back champion v%s → v%s (%s)", name, current.version, previous.version, reason)
    for v in (current.version, previous.version):
        publish_card(settings, str(v))
    return {**record, "aliases": aliases(settings)}


def _audit(client: Any, name: str, version: str, tags: dict[str, str], line: str) -> None:
    _set_tags(client, name, version, tags)
    description = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"{description}\n\n{line}".strip())
