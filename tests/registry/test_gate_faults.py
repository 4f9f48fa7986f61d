"""The real gate (real models, real SQLite registry) when the registry fails while it runs.

Before: ``get_alias`` read any ``MlflowException`` as "no champion"; the gate then applied the
absolute floors only and an untrained challenger (AUC ≈ 0.5, lenient floors) replaced a
trained champion (AUC ≈ 0.99). Now the failed read stops the promotion with
:class:`RegistryUnavailable` and the champion stays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.errors import RegistryUnavailable
from pipeline.registry.contract import CHAMPION, PREVIOUS
from pipeline.registry.read import aliases
from pipeline.registry.write import move_champion
from tests.registry.conftest import GateProject

pytestmark = pytest.mark.slow

LENIENT = ("promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1")


def test_a_registry_error_during_the_gate_keeps_the_better_champion(
        gate_project: GateProject, register_and_gate: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.registry.promote import promote_challenger

    settings = gate_project.named(*LENIENT)
    champion, decision = register_and_gate(settings, gate_project.good)
    move_champion(settings, champion.version, reason=decision.reason)
    real = MlflowClient.get_model_version_by_alias
    failed: list[str] = []

    def flaky(self: MlflowClient, name: str, alias: str) -> Any:
        if alias == CHAMPION:
            failed.append(alias)
            raise MlflowException("INTERNAL_ERROR: database is locked (injected)", error_code="INTERNAL_ERROR")
        return real(self, name, alias)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", flaky)
    with pytest.raises(RegistryUnavailable, match="INTERNAL_ERROR") as err:
        promote_challenger(settings, gate_project.untrained.trained, gate_project.untrained.evaluation)
    monkeypatch.undo()

    assert failed and "no alias was moved" in str(err.value)
    now = aliases(settings)
    assert now[CHAMPION] == str(champion.version) and PREVIOUS not in now
    challenger = now["challenger"]  # registered, never gated: nothing was decided on a failed read
    assert "gate_verdict" not in MlflowClient().get_model_version(settings.registered_model, challenger).tags


def test_the_champion_moving_during_promotion_gates_the_challenger_again(
        gate_project: GateProject, register_and_gate: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A promotion whose gate compared with v1 while another promotion made v2 champion is gated
    again against v2 before ``champion`` moves; the applied decision names v2."""
    from pipeline.registry import promote

    settings = gate_project.named(*LENIENT)
    v1, d1 = register_and_gate(settings, gate_project.good)
    move_champion(settings, v1.version, reason=d1.reason)
    v2, d2 = register_and_gate(settings, gate_project.good)
    real_judge = promote.judge_challenger
    judged: list[Any] = []

    def judge_then_race(*args: Any, **kwargs: Any) -> Any:
        decision = real_judge(*args, **kwargs)
        if not judged:  # the other promotion lands between this gate and this alias move
            move_champion(settings, v2.version, reason=d2.reason, expected_champion=d2.champion_version)
        judged.append(decision)
        return decision

    monkeypatch.setattr(promote, "judge_challenger", judge_then_race)
    result = promote.promote_challenger(settings, gate_project.good.trained, gate_project.good.evaluation)

    assert [d.champion_version for d in judged] == [str(v1.version), str(v2.version)]
    assert result.decision.champion_version == str(v2.version) and result.promoted
    now = aliases(settings)
    assert now[CHAMPION] == str(result.version.version) and now[PREVIOUS] == str(v2.version)
    tags = MlflowClient().get_model_version(settings.registered_model, result.version.version).tags
    assert tags["gate_champion"] == str(v2.version) and tags["previous_champion_version"] == str(v2.version)
