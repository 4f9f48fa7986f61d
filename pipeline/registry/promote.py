"""The one promotion path: register → gate → record the decision → move the aliases.

:func:`promote_challenger` is what the CLI (``xrayops promote``), the Prefect training flow
(through its thin tasks) and the test fixtures run. When ``promote.require_approval`` is set
the alias only moves after a reviewer approved: the caller passes an ``approval`` callback
(the flow passes :func:`flows.approval.request_approval`, which pauses for the Prefect UI
form); without one the version waits for ``xrayops registry approve`` (:func:`approve_version`).
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
from pipeline.errors import PromotionError
from pipeline.evaluation.evaluate import EvalResult
from pipeline.registry.contract import APPROVAL, GATE, ApprovalRecord, VersionRecord, champion_blocker
from pipeline.registry.decision import GateDecision
from pipeline.registry.gate import gate
from pipeline.registry.read import get_version
from pipeline.registry.write import move_champion, record_approval, record_decision, register_version
from pipeline.training.train import TrainResult

logger = logging.getLogger(__name__)

#: ``approval(settings, version, decision)`` → an approval record (``ApprovalRecord.to_dict()``), already recorded.
Approval = Callable[[Settings, Any, GateDecision], dict[str, Any]]

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


def conclude(settings: Settings, version: Any, decision: GateDecision, *,
             approval: Approval | None = None) -> dict[str, Any]:
    """Move ``champion`` to a gated version when the rule allows it, asking ``approval`` when required.

    Returns:
        ``{"promoted": False}`` (gate failed); ``{"promoted": False, "approval": record}`` (rejected,
        timed out, or ``status="pending"`` when approval is required and no callback was given);
        ``{"promoted": True, ["approval": record,] "champion": v, "previous-champion": v | None}``.
    """
    require = settings.promote.require_approval
    blocker = champion_blocker(gate_passed=decision.promote, approved=False, require_approval=require)
    if blocker == GATE:
        logger.info("challenger v%s not promoted: %s", version.version, decision.reason)
        return {"promoted": False}
    if blocker is None:
        return {"promoted": True, **move_champion(settings, version.version, reason=decision.reason)}
    assert blocker == APPROVAL
    if approval is None:
        logger.info("v%s passed the gate and awaits a reviewer (`xrayops registry approve %s`)",
                    version.version, version.version)
        return {"promoted": False, "approval": {"approved": False, "status": PENDING, "version": str(version.version)}}
    answer = approval(settings, version, decision)
    if champion_blocker(gate_passed=True, approved=bool(answer["approved"]), require_approval=require):
        return {"promoted": False, "approval": answer}
    return {"promoted": True, "approval": answer,
            **move_champion(settings, version.version, reason=f"approved by {answer['reviewer']}")}


def promote_challenger(settings: Settings, trained: TrainResult, evaluation: EvalResult, *,
                       approval: Approval | None = None, move_aliases: bool = True) -> Promotion:
    """Register the evaluated model, gate it, record the decision and (when allowed) make it champion.

    Args:
        approval: asked when the gate passed and ``promote.require_approval`` (see :data:`Approval`).
        move_aliases: False stops after recording the decision (``promotion == {"promoted": False}``);
            the aliases are then moved by :func:`conclude` or ``move_champion`` later.
    """
    version = register_version(settings, trained, evaluation)
    decision = judge_challenger(settings, version, evaluation, trained.run_id)
    promotion = conclude(settings, version, decision, approval=approval) if move_aliases else {"promoted": False}
    return Promotion(version, decision, promotion)


def approve_version(settings: Settings, version: str, *, reviewer: str, comment: str,
                    approve: bool) -> dict[str, Any]:
    """A reviewer's decision outside Prefect (CLI): record it; on approval move ``champion``.

    Raises:
        PromotionError: the version did not pass the gate.
    """
    mv = get_version(settings, version)
    record = VersionRecord.from_version(mv)
    if record.champion_blocker(require_approval=False) == GATE:
        verdict = record.gate.verdict if record.gate else "missing"
        raise PromotionError(f"v{version} did not pass the promotion gate (verdict {verdict!r}); it cannot be approved")
    answer = ApprovalRecord(approved=approve, status=ApprovalRecord.APPROVED if approve else ApprovalRecord.REJECTED,
                            reviewer=reviewer, comment=comment,
                            decided_at=datetime.now(UTC).isoformat(timespec="seconds"), version=str(version)).to_dict()
    record_approval(settings, mv, answer)
    if approve:
        answer["aliases"] = move_champion(settings, str(version), reason=f"approved by {reviewer}")
    return answer
