"""The one promotion path: register → gate → record the decision → move the aliases.

:func:`promote_challenger` is what the CLI (``xrayops promote``), the Prefect training flow
(its ``gate-and-promote`` task, after registering in a retried task) and the test fixtures
run. When ``promote.require_approval`` is set the alias only moves after a reviewer approved:
the caller passes an ``approval`` callback (the flow passes
:func:`flows.approval.request_approval`, which pauses for the Prefect UI form); without one
the version waits for ``xrayops registry approve`` (:func:`approve_version`).
Which version may hold ``champion`` is :func:`pipeline.registry.contract.champion_blocker`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import PromotionError, StaleGateDecision
from pipeline.evaluation.evaluate import EvalResult
from pipeline.registry.contract import APPROVAL, CHAMPION, GATE, ApprovalRecord, VersionRecord, champion_blocker
from pipeline.registry.decision import GateDecision
from pipeline.registry.gate import gate
from pipeline.registry.lock import AliasLock, check_shared_lock
from pipeline.registry.read import get_alias, get_version
from pipeline.registry.write import (
    check_gated_against,
    check_promotable,
    move_champion,
    record_approval,
    record_decision,
    register_version,
)
from pipeline.training.train import TrainResult

logger = logging.getLogger(__name__)

#: ``approval(settings, version, decision)`` → an approval record (``ApprovalRecord.to_dict()``), already recorded.
Approval = Callable[[Settings, Any, GateDecision], dict[str, Any]]
#: ``regate()`` → a new decision on the same version against the current champion, already recorded.
Regate = Callable[[], GateDecision]

PENDING = "pending"


@dataclass(frozen=True)
class Promotion:
    """What one promotion did: the registry version, the gate decision and the alias outcome."""

    version: Any  # the MLflow ModelVersion
    decision: GateDecision
    promotion: dict[str, Any]  # {"promoted", ["approval"], ["champion", "previous-champion"]}

    @property
    def promoted(self) -> bool:
        return bool(self.promotion.get("promoted"))

    @property
    def awaiting_approval(self) -> bool:
        """Gate passed, approval required and no reviewer asked here (``xrayops registry approve``)."""
        return (self.promotion.get("approval") or {}).get("status") == PENDING


def judge_challenger(settings: Settings, version: Any, evaluation: EvalResult, run_id: str,
                     dataset_dir: Path | None = None) -> GateDecision:
    """Run the gate on a registered version and record the decision (tags, JSON artifact, model card)."""
    decision = gate(settings, version, evaluation, dataset_dir)
    record_decision(settings, version, decision, run_id)
    return decision


def conclude(settings: Settings, version: Any, decision: GateDecision, *, approval: Approval | None = None,
             regate: Regate | None = None, lock: AliasLock | None = None, attempts: int = 3) -> dict[str, Any]:
    """Move ``champion`` to a gated version when the rule allows it, asking ``approval`` when required.

    The move happens under the registry lock and only if the champion is still the one the gate
    compared with (``decision.champion_version``). When it changed meanwhile (another promotion,
    a rollback), the decision is stale: with ``regate`` (the caller holds the challenger's test
    scores) the version is gated again against the new champion and the move retried, up to
    ``attempts`` gates in all; without it, or after a reviewer approved the old decision (they
    approved a comparison with another model), :class:`~pipeline.errors.StaleGateDecision` is raised.

    Returns:
        ``{"promoted": False}`` (gate failed); ``{"promoted": False, "approval": record}`` (rejected,
        timed out, or ``status="pending"`` when approval is required and no callback was given);
        ``{"promoted": True, ["approval": record,] "champion": v, "previous-champion": v | None}``.

    Raises:
        StaleGateDecision: the champion changed since the gate ran and no re-gate was possible.
    """
    require = settings.promote.require_approval
    answer: dict[str, Any] | None = None
    for attempt in range(1, attempts + 1):
        out: dict[str, Any] = {}
        blocker = champion_blocker(gate_passed=decision.promote, approved=False, require_approval=require)
        if blocker == GATE:
            logger.info("challenger v%s not promoted: %s", version.version, decision.reason)
            return {"promoted": False, **out}
        if blocker == APPROVAL and approval is None:
            logger.info("v%s passed the gate and awaits a reviewer (`xrayops registry approve %s`)",
                        version.version, version.version)
            return {"promoted": False, **out,
                    "approval": {"approved": False, "status": PENDING, "version": str(version.version)}}
        reason = decision.reason
        if blocker == APPROVAL:
            assert approval is not None
            current = get_alias(settings, CHAMPION)
            current_version = str(current.version) if current is not None else None
            if current_version != decision.champion_version and regate is not None and attempt < attempts:
                decision = regate()  # stale already: never ask a reviewer about a comparison that is out of date
                continue
            check_gated_against(settings, str(version.version), decision.champion_version, current_version)
            answer = approval(settings, version, decision)
            out["approval"] = answer
            if champion_blocker(gate_passed=True, approved=bool(answer["approved"]), require_approval=require):
                return {"promoted": False, **out}
            reason = f"approved by {answer['reviewer']}"
        try:
            return {"promoted": True, **out, **move_champion(settings, version.version, reason=reason, lock=lock,
                                                             expected_champion=decision.champion_version)}
        except StaleGateDecision:
            if regate is None or answer is not None or attempt == attempts:
                raise
            logger.warning("v%s: the champion changed since the gate ran; gating it again (%d/%d)",
                           version.version, attempt + 1, attempts)
            decision = regate()
    raise AssertionError("unreachable")  # the last attempt returns or raises


def promote_challenger(settings: Settings, trained: TrainResult, evaluation: EvalResult, *,
                       approval: Approval | None = None, move_aliases: bool = True,
                       lock: AliasLock | None = None, registered: Any = None,
                       on_decision: Callable[[GateDecision], None] | None = None) -> Promotion:
    """Register the evaluated model, gate it, record the decision and (when allowed) make it champion.

    When the champion changes between the gate and the alias move, the version is gated again
    against the new champion (see :func:`conclude`); ``Promotion.decision`` is the one applied.

    Args:
        approval: asked when the gate passed and ``promote.require_approval`` (see :data:`Approval`).
        move_aliases: False stops after recording the decision (``promotion == {"promoted": False}``);
            the aliases are then moved by :func:`conclude` or ``move_champion`` later.
        lock: an outer lock around alias moves (see :func:`pipeline.registry.lock.alias_lock`).
        registered: the version :func:`register_version` already made for ``trained`` (the Prefect
            flow registers in its own retried task); None registers it here.
        on_decision: called with each recorded decision (the first and any re-gate), e.g. to publish it.
    """
    if move_aliases:
        check_shared_lock(settings, lock)  # refused before anything is registered, not at the alias move
    version = registered if registered is not None else register_version(settings, trained, evaluation)
    decisions: list[GateDecision] = []

    def judge() -> GateDecision:
        decisions.append(judge_challenger(settings, version, evaluation, trained.run_id))
        if on_decision is not None:
            on_decision(decisions[-1])
        return decisions[-1]

    decision = judge()
    if not move_aliases:
        return Promotion(version, decision, {"promoted": False})
    promotion = conclude(settings, version, decision, approval=approval, lock=lock, regate=judge)
    return Promotion(version, decisions[-1], promotion)


def approve_version(settings: Settings, version: str, *, reviewer: str, comment: str, approve: bool,
                    lock: AliasLock | None = None) -> dict[str, Any]:
    """A reviewer's decision outside Prefect (CLI): record it; on approval move ``champion``.

    An approval is refused before it is recorded when the version could not become champion:
    it failed the gate, was rolled back, is not a READY registration, or was gated against
    another champion than the current one (approving would replace a model the gate never
    compared it with; gate it again first). The move itself re-checks all of that under the
    registry lock.

    Raises:
        PromotionError: the version did not pass the gate, or may not be approved (see above).
        StaleGateDecision: the champion changed since the version was gated.
    """
    if approve:
        check_shared_lock(settings, lock)  # refused before the approval is recorded, not at the alias move
    mv = get_version(settings, version)
    record = VersionRecord.from_version(mv)
    if record.champion_blocker(require_approval=False) == GATE:
        verdict = record.gate.verdict if record.gate else "missing"
        raise PromotionError(f"v{version} did not pass the promotion gate (verdict {verdict!r}); it cannot be approved")
    if approve:
        check_promotable(settings, str(version), require_approval=False)
        current = get_alias(settings, CHAMPION)
        assert record.gate is not None
        check_gated_against(settings, str(version), record.gate.champion,
                            str(current.version) if current is not None else None)
    answer = ApprovalRecord(approved=approve, status=ApprovalRecord.APPROVED if approve else ApprovalRecord.REJECTED,
                            reviewer=reviewer, comment=comment,
                            decided_at=datetime.now(UTC).isoformat(timespec="seconds"), version=str(version)).to_dict()
    record_approval(settings, mv, answer)
    if approve:
        answer["aliases"] = move_champion(settings, str(version), reason=f"approved by {reviewer}", lock=lock,
                                          expected_champion=record.gate.champion)
    return answer
