"""Human approval in the Prefect test harness: the flow pauses with a typed form; a reviewer
resumes it with ``resume_flow_run(id, run_input=...)`` (what the UI's form does)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from mlflow import MlflowClient

from pipeline.registry.read import aliases
from pipeline.registry.write import move_champion
from tests.registry.conftest import GateProject

pytestmark = pytest.mark.slow


def _paused_run(flow_name: str, timeout: float = 60) -> Any:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
            paused = [r for r in runs if r.state is not None and r.state.is_paused()]
            if paused:
                return paused[0]
            time.sleep(0.3)
    raise AssertionError(f"flow {flow_name} never paused")


def _start_promotion(settings: Any, version: Any, candidate: Any) -> tuple[str, threading.Thread, list[Any]]:
    """Run the flow's real ``gate-and-promote`` task inside a flow in a thread (it blocks while paused)."""
    from prefect import flow

    from flows.training import gate_and_promote

    name = f"approval-{uuid.uuid4().hex[:8]}"

    @flow(name=name)
    def promotion() -> dict[str, Any]:
        return gate_and_promote(settings, version, candidate.evaluation, candidate.trained).promotion

    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(promotion(return_state=True)), daemon=True)
    thread.start()
    return name, thread, results


@pytest.fixture
def gated_challenger(gate_project: GateProject, register_and_gate: Callable[..., Any]) -> tuple[Any, ...]:
    """A champion (v1), a gate-passing challenger (v2) awaiting approval and v2's candidate."""
    plain = gate_project.named()
    v1, d1 = register_and_gate(plain, gate_project.good)
    move_champion(plain, v1.version, reason=d1.reason)
    settings = gate_project.named("promote.require_approval=true", "promote.approval_timeout_s=60",
                                  f"promote.registered_model={plain.registered_model}")
    v2, d2 = register_and_gate(settings, gate_project.good)
    assert d2.promote, d2.reason
    return settings, v1, v2, d2, gate_project.good


@pytest.mark.parametrize("approve", [True, False], ids=["approve", "reject"])
def test_reviewer_decides_in_the_paused_flow(prefect_harness: None, gated_challenger: tuple[Any, ...],
                                             approve: bool) -> None:
    from prefect.flow_runs import resume_flow_run

    settings, v1, v2, _, candidate = gated_challenger
    name, thread, results = _start_promotion(settings, v2, candidate)
    paused = _paused_run(name)
    assert aliases(settings)["champion"] == str(v1.version)  # nothing moves while waiting

    resume_flow_run(paused.id, run_input={"approve": approve, "reviewer": "Dr. Reviewer", "comment": "checked card"})
    thread.join(60)
    assert not thread.is_alive() and results, "the flow did not finish after resume"

    assert results[0].is_completed(), results[0]
    outcome = results[0].result()
    tags = MlflowClient().get_model_version(settings.registered_model, v2.version).tags
    assert tags["approval_status"] == ("approved" if approve else "rejected")
    assert tags["approval_reviewer"] == "Dr. Reviewer" and tags["approval_comment"] == "checked card"
    assert tags["approval_decided_at"]
    now = aliases(settings)
    if approve:
        assert outcome["promoted"] is True
        assert now["champion"] == str(v2.version) and now["previous-champion"] == str(v1.version)
    else:
        assert outcome["promoted"] is False and outcome["approval"]["status"] == "rejected"
        assert now["champion"] == str(v1.version) and "previous-champion" not in now


def test_no_answer_times_out_and_keeps_the_champion(prefect_harness: None, gated_challenger: tuple[Any, ...]) -> None:
    from pipeline.config import with_overrides

    settings, v1, v2, _, candidate = gated_challenger
    settings = with_overrides(settings, ["promote.approval_timeout_s=2"])
    name, thread, results = _start_promotion(settings, v2, candidate)
    _paused_run(name)
    thread.join(60)
    assert not thread.is_alive()
    tags = MlflowClient().get_model_version(settings.registered_model, v2.version).tags
    assert tags["approval_status"] == "timeout"
    assert aliases(settings)["champion"] == str(v1.version)
    assert results and results[0].is_completed(), results  # the flow goes on; it does not fail
    assert results[0].result()["promoted"] is False
