"""Writing the registry: new versions, gate decisions, approvals, alias moves, rollback.

Every evaluated model becomes a new version with lineage tags, exports (SavedModel + ONNX,
parity-checked), a model card and alias ``challenger``. ``champion`` only ever points at a
version whose gate verdict is ``pass`` (and that a reviewer approved when
``promote.require_approval``): :func:`move_champion` refuses anything else. Alias moves are
ordered so an interruption leaves them consistent: ``previous-champion`` is set to the old
champion *before* ``champion`` moves. Every move and rollback is recorded on the versions.
Tag keys and artifact paths are :mod:`pipeline.registry.contract`'s.

Every action is also appended to the hash-chained audit log (:mod:`pipeline.audit`), failing
closed: alias moves and rollback write an ``intent`` record before the registry is touched and
``done``/``failed`` after; registration, gate decisions and approvals are recorded once MLflow
holds them, and an audit write that fails raises before any alias moves.
"""

from __future__ import annotations

import enum
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import audit
from pipeline.config import Settings
from pipeline.connections import mask_uri
from pipeline.errors import PromotionError, RegistryError, StaleGateDecision
from pipeline.evaluation.evaluate import EvalResult
from pipeline.registry.contract import (
    APPROVAL,
    CHALLENGER,
    CHAMPION,
    GATE,
    NOT_READY,
    PREVIOUS,
    READY,
    ROLLED_BACK,
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
from pipeline.registry.lock import AliasLock, alias_lock
from pipeline.registry.read import aliases, get_alias, registry_failure, version_record
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
    audit.record(settings, audit.REGISTER, version=mv.version, details={
        "run_id": trained.run_id, "source": mask_uri(trained.model_uri), "model_arch": trained.model_name,
        "dataset": trained.dataset.get("name"), "dvc_md5": trained.dataset.get("dvc_md5")})
    with audit.audited(settings, audit.ALIAS_MOVE, version=mv.version,
                       details={"aliases": {CHALLENGER: str(mv.version)}}):
        client.set_registered_model_alias(name, CHALLENGER, mv.version)
    logger.info("registered %s version %s (alias %s)", name, mv.version, CHALLENGER)
    publish_card(settings, mv.version)
    return client.get_model_version(name, mv.version)


def publish_card(settings: Settings, version: str) -> Path | None:
    """(Re)write the version's evidence pack, then its model card (which links the pack); a failure of
    either is logged, never fatal to promotion."""
    from pipeline.registry.evidence import publish_evidence
    from pipeline.registry.modelcard import publish_model_card

    try:
        publish_evidence(settings, version)
    except Exception:
        logger.exception("could not write the evidence pack of v%s", version)
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
    audit.record(settings, audit.GATE_DECISION, version=version.version, details={
        "verdict": GateTags.PASS if decision.promote else GateTags.FAIL, "failed": decision.failed,
        "champion_version": decision.champion_version, "reason": decision.reason, "decided_at": decision.decided_at})
    publish_card(settings, version.version)


def record_approval(settings: Settings, version: Any, approval: dict[str, Any]) -> None:
    """Store a reviewer's decision (``ApprovalRecord.to_dict()``, or the timeout) on the version and in its run."""
    client = configure_mlflow(settings)
    _set_tags(client, settings.registered_model, version.version, ApprovalTags.of(approval).to_tags())
    client.log_dict(version.run_id, approval, approval_artifact(version.version))
    audit.record(settings, audit.APPROVAL, version=version.version, actor=approval.get("reviewer") or None,
                 details={key: approval.get(key) for key in ("status", "approved", "comment", "decided_at")})
    publish_card(settings, version.version)


# --------------------------------------------------------------------------- aliases


class Unchecked(enum.Enum):
    """``expected_champion`` of a manual move: the champion it replaces is not checked."""

    UNCHECKED = "unchecked"


UNCHECKED = Unchecked.UNCHECKED


def check_promotable(settings: Settings, version: str, *, require_approval: bool | None = None) -> VersionRecord:
    """The version's record, if it may hold ``champion``: registered (READY), never rolled back, gate
    passed, and approved when approval is required (``promote.require_approval`` unless given).

    Raises:
        PromotionError: it may not (the message says why and what to do).
    """
    record = version_record(settings, version)
    require = settings.promote.require_approval if require_approval is None else require_approval
    blocker = record.champion_blocker(require_approval=require)
    what = f"{settings.registered_model} v{version}"
    if blocker == NOT_READY:
        raise PromotionError(f"{what} cannot become champion: its registration status is {record.status!r}, not "
                             f"{READY!r}; register the model again (`xrayops promote`)")
    if blocker == ROLLED_BACK:
        assert record.rollback is not None
        raise PromotionError(f"{what} cannot become champion: it was rolled back at {record.rollback.at} by "
                             f"{record.rollback.by or '-'} ({record.rollback.reason}); train and gate a new version "
                             "instead")
    if blocker == GATE:
        raise PromotionError(f"{what} cannot become champion: its gate verdict is "
                             f"{_verdict(record)!r} (failed: {record.gate.failed_text if record.gate else '-'}); "
                             "only versions that passed the promotion gate may be champion")
    if blocker == APPROVAL:
        status = record.approval.status if record.approval else "missing"
        raise PromotionError(f"{what} needs a reviewer's approval first (approval_status={status!r}); "
                             "approve it in the Prefect UI or set promote.require_approval=false")
    return record


def _verdict(record: VersionRecord) -> str:
    return record.gate.verdict if record.gate else "missing"


def check_gated_against(settings: Settings, version: str, gated_against: str | None, current: str | None) -> None:
    """Refuse a move whose gate compared ``version`` with another champion than the current one.

    Raises:
        StaleGateDecision: the champion changed since the gate ran.
    """
    if gated_against == current:
        return
    against = f"v{gated_against}" if gated_against else "no champion (absolute floors only)"
    now = f"v{current}" if current else "none"
    raise StaleGateDecision(
        f"{settings.registered_model} v{version} was gated against {against} but the champion is {now} now: "
        "its gate decision does not compare it with the model it would replace",
        hint="gate it again against the current champion: re-run the promotion (`xrayops promote` or the training "
             "flow), then approve the new decision")


def move_champion(settings: Settings, version: str, *, reason: str,
                  expected_champion: str | None | Unchecked = UNCHECKED,
                  lock: AliasLock | None = None) -> dict[str, str | None]:
    """Point ``champion`` at ``version``; the old champion becomes ``previous-champion``.

    Under the registry's alias lock (:func:`pipeline.registry.lock.alias_lock`; ``lock`` is an
    outer lock such as a Prefect global concurrency limit), the version's record and the current
    champion are read afresh, then ``previous-champion`` moves (to the still-current champion)
    before ``champion``, and both are read back. Every promotion path passes
    ``expected_champion`` (the champion its gate decision compared with, ``decision.champion_version``);
    when the champion changed since, the move is refused (:class:`StaleGateDecision`) rather than
    re-gated here: re-gating needs the challenger's test scores, which only the caller has
    (:func:`pipeline.registry.promote.conclude` re-gates and retries). ``UNCHECKED`` is a
    deliberate manual move (scripts, tests).

    A registry error while writing puts back whatever had changed and raises; the aliases are
    never left half-moved without saying so.

    Raises:
        PromotionError: ``version`` may not hold champion (see :func:`check_promotable`).
        StaleGateDecision: the champion is not ``expected_champion``.
        RegistryUnavailable: the registry failed; the message says whether the aliases are unchanged.
        RegistryError: the aliases read back differ from what was written (a writer outside the lock).
    """
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    name, version = settings.registered_model, str(version)
    with alias_lock(settings, lock):
        record = check_promotable(settings, version)
        old = get_alias(settings, CHAMPION)
        old_version = str(old.version) if old is not None else None
        if not isinstance(expected_champion, Unchecked):
            check_gated_against(settings, version, expected_champion, old_version)
        before = aliases(settings)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        replaced = old_version if old_version != version else None
        expected = {**before, CHAMPION: version}
        moves = {PREVIOUS: replaced, CHAMPION: version} if replaced is not None else {CHAMPION: version}
        with audit.audited(settings, audit.ALIAS_MOVE, version=version,
                           details={"aliases": moves, "before": before, "reason": reason}):
            try:
                if replaced is not None:
                    _set_tags(client, name, version, ChampionTags(previous_version=replaced).to_tags())
                    client.set_registered_model_alias(name, PREVIOUS, replaced)
                    expected[PREVIOUS] = replaced
                client.set_registered_model_alias(name, CHAMPION, version)
            except MlflowException as exc:
                changed_tag = record if replaced is not None else None
                raise _undo(settings, client, before, changed_tag, f"move champion to v{version}", exc) from exc
            _confirm(settings, expected, f"champion → v{version}")
        try:
            _set_tags(client, name, version, ChampionTags(since=now, reason=reason).to_tags())
        except MlflowException as exc:
            raise registry_failure(settings, f"record on v{version} when and why it became champion", exc,
                                   outcome=f"the aliases did move ({expected}); only that audit tag is missing"
                                   ) from exc
    logger.info("%s: champion → v%s (previous: %s)", name, version, old_version)
    publish_card(settings, version)
    return {"champion": version, PREVIOUS: replaced}


def _undo(settings: Settings, client: Any, before: dict[str, str], record: VersionRecord | None, what: str,
          exc: Exception) -> RegistryError:
    """Put back the aliases (and ``record``'s previous-champion tag, when given) that changed before
    ``exc``; the error to raise says whether that worked."""
    from mlflow.exceptions import MlflowException

    name = settings.registered_model
    try:
        now = aliases(settings)
        for alias in (CHAMPION, PREVIOUS):
            if now.get(alias) == before.get(alias):
                continue
            if before.get(alias) is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, before[alias])
        previous = record.champion.previous_version if record is not None else None
        if record is not None and previous is None:
            client.delete_model_version_tag(name, record.version, "previous_champion_version")
        elif record is not None:
            _set_tags(client, name, record.version, ChampionTags(previous_version=previous).to_tags())
        restored = aliases(settings) == before
    except (MlflowException, RegistryError):
        restored = False
    if restored:
        return registry_failure(settings, what, exc, outcome="the aliases are unchanged (what had moved was put back)")
    return registry_failure(
        settings, what, exc, outcome=f"the aliases could not be put back and may be inconsistent (they were {before})",
        hint="check them with `xrayops registry show` once the registry answers, and restore them "
             "(`xrayops registry rollback`, or MLflow's UI)")


def _confirm(settings: Settings, expected: dict[str, str], what: str) -> None:
    """Read the aliases back after a move; a difference means a writer outside the lock."""
    now = aliases(settings)
    wrong = {a: (now.get(a), expected.get(a)) for a in (CHAMPION, PREVIOUS) if now.get(a) != expected.get(a)}
    if wrong:
        raise RegistryError(
            f"{settings.registered_model}: after {what} the registry shows "
            + ", ".join(f"{a}={got} (expected {want})" for a, (got, want) in wrong.items())
            + ": another writer moved the aliases outside the registry lock",
            hint="every writer must share the lock: the same paths.home (or SQLite registry folder) on one machine, "
                 "or promote.registry_write_limit with a registry server shared by several machines; check the "
                 "aliases with `xrayops registry show`")


def rollback(settings: Settings, *, reason: str, actor: str, lock: AliasLock | None = None) -> dict[str, Any]:
    """Move ``champion`` back to ``previous-champion``, with an audit record.

    Under the registry's alias lock. The audit record is stored as tags, a description line and a
    JSON artifact (``registry/rollback-<time>.json`` in the training run) on both versions; the
    rolled-back version can never be champion again (:func:`check_promotable`).
    ``previous-champion`` then points at the champion before the restored one, if known.

    Fail-closed order: the rolled-back version is marked (``rolled_back_*`` tags, the ``rolled_back_at``
    marker last) and the restored one tagged (``champion_since``, ``restored_by``) *before* any alias
    moves, so an interruption at any point leaves the bad version marked: it can no longer be
    approved or made champion, and serving no longer trusts it. A registry error while moving the
    aliases puts them back (:func:`_undo`) and raises; the mark stays (retry the rollback).

    Raises:
        PromotionError: no champion or no previous champion to return to, or that one was rolled back.
        RegistryUnavailable: the registry failed (the message says what was written and whether the
            aliases are unchanged).
        RegistryError: the aliases read back differ from what was written (a writer outside the lock).
    """
    from mlflow.exceptions import MlflowException

    client = configure_mlflow(settings)
    name = settings.registered_model
    with alias_lock(settings, lock):
        current, previous = get_alias(settings, CHAMPION), get_alias(settings, PREVIOUS)
        if current is None or previous is None or previous.version == current.version:
            raise PromotionError(f"{name}: nothing to roll back to (champion={getattr(current, 'version', None)}, "
                                 f"previous-champion={getattr(previous, 'version', None)}); "
                                 "see `xrayops registry show`")
        target = VersionRecord.from_version(previous)
        if target.rollback is not None:
            raise PromotionError(f"{name}: previous-champion v{previous.version} was itself rolled back at "
                                 f"{target.rollback.at}; promote a gated version instead")
        now = datetime.now(UTC).isoformat(timespec="seconds")
        bad, good = str(current.version), str(previous.version)
        record = {"action": "rollback", "model": name, "from_version": bad, "to_version": good,
                  "reason": reason, "actor": actor, "at": now}
        before = aliases(settings)
        earlier = target.champion.previous_version
        expected = {**before, CHAMPION: good}
        keep_earlier = bool(earlier) and earlier not in (good, bad)
        moves = {CHAMPION: good, PREVIOUS: earlier if keep_earlier else None}
        retry = "retry `xrayops registry rollback` when the registry answers (`xrayops registry show` checks it)"
        with audit.audited(settings, audit.ROLLBACK, version=good, actor=actor, details={
                "from_version": bad, "to_version": good, "reason": reason, "aliases": moves, "before": before}):
            marks = RollbackTags(at=now, reason=reason, by=actor).to_tags()
            at = marks.pop("rolled_back_at")
            try:  # the marker last: a partly written mark is no mark
                _set_tags(client, name, bad, {**marks, "rolled_back_at": at})
            except MlflowException as exc:
                raise registry_failure(settings, f"mark v{bad} as rolled back", exc,
                                       outcome="the aliases are unchanged (champion is still v" + bad + ")",
                                       hint=retry) from exc
            try:
                _set_tags(client, name, good, ChampionTags(since=now, reason=f"rollback: {reason}",
                                                           restored_by=actor).to_tags())
                for run_id in {current.run_id, previous.run_id}:
                    client.log_dict(run_id, record, rollback_artifact(now))
            except (MlflowException, OSError) as exc:
                raise registry_failure(
                    settings, f"record the rollback to v{good}", exc,
                    outcome=f"the aliases are unchanged (champion is still v{bad}); v{bad} is already marked "
                            "rolled back, so it can no longer be approved, made champion or trusted by serving",
                    hint=retry) from exc
            try:
                client.set_registered_model_alias(name, CHAMPION, good)
                if keep_earlier:
                    assert earlier is not None
                    client.set_registered_model_alias(name, PREVIOUS, earlier)
                    expected[PREVIOUS] = earlier
                else:
                    client.delete_registered_model_alias(name, PREVIOUS)
                    expected.pop(PREVIOUS, None)
            except MlflowException as exc:
                raise _undo(settings, client, before, None, f"roll back to v{good} (v{bad} stays marked rolled "
                            "back)", exc) from exc
            _confirm(settings, expected, f"rollback to v{good}")
        for version, line in ((bad, f"Rolled back {now} by {actor}: {reason}"),
                              (good, f"Restored as champion {now} by {actor}: {reason}")):
            try:  # the record is complete without it (tags + artifact): a failure here is not fatal
                _describe(client, name, version, line)
            except MlflowException as exc:
                logger.warning("rollback to v%s done; could not add its line to v%s's description (%s)",
                               good, version, getattr(exc, "error_code", None) or type(exc).__name__)
    logger.warning("%s: rolled back champion v%s → v%s (%s)", name, bad, good, reason)
    for v in (bad, good):
        publish_card(settings, v)
    return {**record, "aliases": aliases(settings)}


def _describe(client: Any, name: str, version: str, line: str) -> None:
    description = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"{description}\n\n{line}".strip())
