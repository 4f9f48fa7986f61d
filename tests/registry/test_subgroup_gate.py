"""Optional subgroup criteria of the promotion gate: per-subgroup sensitivity floors and worst-subgroup
non-inferiority against the champion. Pure ``decide`` on synthetic subgroup tables, plus one run of the real
gate on the session's trained models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pipeline.config import load_settings
from pipeline.evaluation.subgroups import SubgroupSpec, rows_of, subgroup_auc, subgroup_table
from pipeline.registry.decision import Evidence, decide, subgroup_criteria
from tests.conftest import REPO
from tests.evaluation.test_subgroups import cohort
from tests.registry.test_decide import BINARY_FLOORS, DATA, GOOD_DATA, cfg

SPEC = SubgroupSpec(["site"], min_patients=10, n_resamples=200, seed=0, level=0.95)
FLOOR_C = "subgroup_sensitivity_ci_low[site=site-C]"
WORST = "worst_subgroup_auc (non-inferiority)"


def evidence(bad_site: str = "site-C", champion_bad_site: str | None = None, champion: str | None = None) -> Evidence:
    """A challenger that fails at ``bad_site``; with ``champion``, a champion that fails at ``champion_bad_site``."""
    frame, y, p = cohort(bad_site=bad_site)
    rows = rows_of(subgroup_table(frame, y, p, 0.5, SPEC), "site")
    champion_auc = None
    delta = None
    if champion is not None:
        _, _, p_champ = cohort(bad_site=champion_bad_site or "none")
        champion_auc = subgroup_auc(frame, y, p_champ, "site", 10)
        delta = {"delta_auc": 0.0, "ci": [-0.01, 0.01], "resamples": 100}
    return Evidence("binary", {"auc": 0.9, "ece": 0.05}, {"sensitivity": [0.8, 0.9]}, GOOD_DATA, champion, delta,
                    subgroups=rows, champion_subgroup_auc=champion_auc)


def run(ev: Evidence, **over: Any) -> Any:
    return decide(ev, cfg(subgroup_by="site", **over), model="m", challenger_version="2")


def test_defaults_in_params_yaml_leave_the_subgroup_criteria_off() -> None:
    promote = load_settings(REPO / "params.yaml").promote
    assert promote.subgroup_sensitivity_ci_floor is None and promote.subgroup_auc_margin is None
    ev = evidence(champion="1")
    assert subgroup_criteria(ev, promote) == []
    decision = decide(ev, promote, model="m", challenger_version="2")
    assert [c.name for c in decision.criteria] == [*BINARY_FLOORS, "delta_auc_ci_low (non-inferiority)", *DATA]


def test_sensitivity_floor_fails_the_site_where_the_model_is_bad_and_passes_the_others() -> None:
    decision = run(evidence(), subgroup_sensitivity_ci_floor=0.6, subgroup_min_patients=20)
    by_name = {c.name: c for c in decision.criteria}
    assert decision.failed == [FLOOR_C] and not decision.promote and FLOOR_C in decision.reason
    assert by_name[FLOOR_C].value < 0.4 and by_name[FLOOR_C].threshold == ">= 0.6 (60 patients)"
    for site in ("site-A", "site-B"):
        assert by_name[f"subgroup_sensitivity_ci_low[site={site}]"].passed
    assert run(evidence(), subgroup_sensitivity_ci_floor=0.0, subgroup_min_patients=20).promote


def test_groups_below_the_minimum_size_are_not_checked_and_no_checkable_group_fails_closed() -> None:
    decision = run(evidence(), subgroup_sensitivity_ci_floor=0.6, subgroup_min_patients=61)
    assert decision.failed == ["subgroup_sensitivity_ci_low[site]"]
    assert "none found" in decision.criteria[3].threshold
    unknown_attribute = Evidence("binary", {"auc": 0.9, "ece": 0.05}, {"sensitivity": [0.8, 0.9]}, GOOD_DATA)
    assert run(unknown_attribute, subgroup_sensitivity_ci_floor=0.6).failed == ["subgroup_sensitivity_ci_low[site]"]


def test_worst_subgroup_non_inferiority_against_the_champion() -> None:
    # the challenger is bad at site-C, the champion is good everywhere: worst AUC ≈ 0.53 vs ≈ 1.0
    worse = run(evidence(champion="1"), subgroup_auc_margin=0.05)
    assert worse.failed == [WORST]
    criterion = {c.name: c for c in worse.criteria}[WORST]
    assert criterion.value < 0.75 and "champion's worst site group AUC 1.0 - 0.05" in criterion.threshold
    # both are bad at some site: the challenger's worst is no worse than the champion's
    assert run(evidence(champion="1", champion_bad_site="site-A"), subgroup_auc_margin=0.05).promote
    # no champion: nothing to compare with, the criterion is not applied
    assert WORST not in [c.name for c in run(evidence(), subgroup_auc_margin=0.05).criteria]
    # a champion whose groups are unknown cannot be compared: fail closed
    missing = evidence(champion="1")
    missing.champion_subgroup_auc = {}
    assert run(missing, subgroup_auc_margin=0.05).failed == [WORST]


def test_multiclass_models_are_not_given_subgroup_criteria() -> None:
    ev = Evidence("multiclass", {"accuracy": 0.95}, {"accuracy": [0.9, 0.97]}, GOOD_DATA)
    decision = run(ev, subgroup_sensitivity_ci_floor=0.9, subgroup_auc_margin=0.0)
    assert decision.promote and not any(c.name.startswith(("subgroup", "worst")) for c in decision.criteria)


@pytest.mark.slow
def test_real_gate_checks_subgroups_of_the_evaluation_and_the_rescored_champion(
        gate_project: Any, register_and_gate: Callable[..., Any]) -> None:
    from pipeline.registry.write import move_champion

    good, untrained = gate_project.good.evaluation, gate_project.untrained.evaluation
    assert {r["attribute"] for r in good.subgroups["groups"]} >= {"sex"}
    assert good.to_json()["subgroups"] == good.subgroups  # written to metrics.json and logged with the run
    settings = gate_project.named("promote.subgroup_by=sex", "promote.subgroup_min_patients=5",
                                  "promote.subgroup_sensitivity_ci_floor=0", "promote.subgroup_auc_margin=0.05")
    mv, first = register_and_gate(settings, gate_project.good)
    assert first.promote, first.reason
    assert {c.name for c in first.criteria} >= {"subgroup_sensitivity_ci_low[sex=F]",
                                                "subgroup_sensitivity_ci_low[sex=M]"}
    assert WORST not in {c.name for c in first.criteria}  # no champion yet
    move_champion(settings, mv.version, reason=first.reason)

    _, again = register_and_gate(settings, gate_project.good)
    assert again.inputs["champion_subgroup_auc"] == {r["group"]: r["metrics"]["auc"]
                                                     for r in rows_of(good.subgroups, "sex")}
    assert {c.name: c.passed for c in again.criteria}[WORST]
    _, worse = register_and_gate(settings, gate_project.untrained)
    assert WORST in worse.failed, worse.to_dict()
    assert untrained.subgroups is not None
