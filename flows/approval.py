"""Human approval of a gate-passing challenger, in the Prefect UI.

The flow run pauses with a typed form (:class:`ApprovalInput`: approve / reject, reviewer,
comment) under a markdown description of the gate decision. A reviewer resumes it from the
UI (or ``prefect flow-run resume``, or ``resume_flow_run(id, run_input={...})``). The answer,
the reviewer and the time are stored on the registry version; no answer within
``promote.approval_timeout_s`` is recorded as ``timeout`` and leaves ``champion`` unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from pipeline.config import Settings


class ApprovalInput(RunInput):
    """The reviewer's form."""

    approve: bool = Field(description="Approve: move `champion` to this version. Leave unticked to reject.")
    reviewer: str = Field(min_length=1, max_length=100, description="Your name (recorded on the model version).")
    comment: str = Field("", max_length=1000, description="Why; recorded on the model version.")


def request_approval(settings: Settings, version: Any, decision: Any) -> dict[str, Any]:
    """Pause the flow run until a reviewer approves or rejects ``version`` (or the timeout passes).

    Returns:
        ``{"approved", "status" (approved | rejected | timeout), "reviewer", "comment", "decided_at",
        "version"}`` — also stored on the version as ``approval_*`` tags and a JSON artifact.
    """
    from pipeline.registry.contract import ApprovalRecord
    from pipeline.registry.write import record_approval

    logger = get_run_logger()
    description = approval_markdown(settings, version, decision)
    create_markdown_artifact(description, key="approval-request", description="Promotion awaiting a reviewer")
    logger.info("v%s passed the gate: waiting up to %d s for a reviewer (Prefect UI → this flow run → Resume)",
                version.version, settings.promote.approval_timeout_s)
    try:
        answer = pause_flow_run(wait_for_input=ApprovalInput.with_initial_data(description=description),
                                timeout=settings.promote.approval_timeout_s,
                                poll_interval=settings.promote.approval_poll_s)
    except FlowPauseTimeout:
        _continue_after_timeout()
        approved, status, reviewer = False, ApprovalRecord.TIMEOUT, None
        comment = f"no reviewer answered within {settings.promote.approval_timeout_s} s; champion unchanged"
    else:
        approved, reviewer, comment = bool(answer.approve), answer.reviewer, answer.comment
        status = ApprovalRecord.APPROVED if approved else ApprovalRecord.REJECTED
    record = ApprovalRecord(approved, status, reviewer, comment, datetime.now(UTC).isoformat(timespec="seconds"),
                            str(version.version)).to_dict()
    record_approval(settings, version, record)
    logger.info("approval of v%s: %s by %s", version.version, record["status"], record["reviewer"] or "-")
    return record


def _continue_after_timeout() -> None:
    """Put the expired paused run back to Running so the rest of the flow completes normally.

    Without this the server keeps the run Paused and marks it Failed ("never resumed") at the
    end, although nothing failed: the champion simply stays where it is.
    """
    from prefect import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Running

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(ctx.flow_run.id, Running(message="approval timed out; not promoted"), force=True)


def approval_markdown(settings: Settings, version: Any, decision: Any) -> str:
    """What the reviewer sees above the form: the gate table and where the model card is."""
    from pipeline.registry.contract import MODEL_CARD_DIR, card_path

    return (f"## Approve {settings.registered_model} v{version.version} as champion?\n\n"
            f"{decision.to_markdown()}\n"
            f"Model card: `{card_path(settings, str(version.version))}` (also in the MLflow run artifacts, "
            f"`{MODEL_CARD_DIR}/`).\n\nTick **approve** to move `champion` to v{version.version}; leave it unticked to "
            "reject. Either way your name, comment and the time are recorded on the version.")
