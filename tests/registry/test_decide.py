"""The promotion decision as a pure function (pipeline.registry.decision.decide): no MLflow, no model, no files.

Each criterion is checked at its boundary as the gate defines it (floors ``>=``, ECE ``<=``, the paired Δ lower
bound ``>`` −margin and, for superiority, ``> 0``), with NaN / inf / None / missing values and empty or
degenerate intervals, with and without a champion, binary and multi-class, and with failing data checks.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest

from pipeline.config import PromoteSection
from pipeline.registry.decision import DataChecks, Evidence, GateDecision, decide

NAN, INF = float("nan"), float("inf")
GOOD_DATA = DataChecks(certificate_ok=True, patient_overlap=0, split_matches=True, validation_ok=True,
                       split_manifest_ok=True, validation_manifest_ok=True)
BINARY_FLOORS = ["auc_floor", "sensitivity_ci_low", "ece"]
DATA = ["split_patient_overlap", "split_certificate_match", "split_manifest_match", "data_validation",
        "validation_manifest_match"]
NON_INF, SUP = "delta_auc_ci_low (non-inferiority)", "delta_auc_ci_low (superiority)"


def cfg(**over: Any) -> PromoteSection:
    base = {"registered_model": "m", "min_auc": 0.75, "min_accuracy": 0.9, "sensitivity_ci_floor": 0.7,
            "auc_margin": 0.02, "require_superiority": False, "max_ece": 0.2, "require_approval": False,
            "approval_timeout_s": 60, "approval_poll_s": 1, "export_onnx": False, "registry_lock_timeout_s": 5,
            "registry_write_limit": None, "subgroup_by": "site", "subgroup_min_patients": 20,
            "subgroup_sensitivity_ci_floor": None, "subgroup_auc_margin": None}
    return PromoteSection(**{**base, **over})


def binary(auc: Any = 0.9, sens_ci: Any = (0.8, 0.95), ece: Any = 0.05, *, delta_ci: Any = None,
           champion: str | None = None, data: DataChecks = GOOD_DATA) -> Evidence:
    metrics = {"auc": auc, "ece": ece, "sensitivity": 0.9}
    ci = {"sensitivity": list(sens_ci) if sens_ci is not None else None}
    delta = None if delta_ci is None else {"delta_auc": 0.0, "ci": list(delta_ci), "resamples": 100}
    return Evidence("binary", metrics, ci, data, champion, delta)


def multiclass(accuracy: Any = 0.95, *, delta_ci: Any = None, champion: str | None = None) -> Evidence:
    delta = None if delta_ci is None else {"delta_accuracy": 0.0, "ci": list(delta_ci), "resamples": 100}
    return Evidence("multiclass", {"accuracy": accuracy, "macro_f1": 0.9}, {"accuracy": [0.9, 0.97]}, GOOD_DATA,
                    champion, delta)


def run(evidence: Evidence, **over: Any) -> GateDecision:
    return decide(evidence, cfg(**over), model="m", challenger_version="2")


def by_name(decision: GateDecision) -> dict[str, Any]:
    return {c.name: c for c in decision.criteria}


# --------------------------------------------------------------------------- the whole decision


def test_a_good_challenger_without_champion_passes_on_absolute_floors_only() -> None:
    d = run(binary())
    assert d.promote and d.failed == []
    assert [c.name for c in d.criteria] == BINARY_FLOORS + DATA
    assert d.champion_version is None and d.challenger_version == "2" and d.model == "m"
    assert d.reason == "all criteria passed (no champion: absolute floors only)"


def test_without_champion_the_delta_is_ignored_and_floors_still_fail() -> None:
    d = run(binary(auc=0.5, delta_ci=(0.1, 0.2)))
    assert not d.promote and d.failed == ["auc_floor"]
    assert d.reason == "failed: auc_floor (no champion: absolute floors only)"
    assert not any(c.name.startswith("delta") for c in d.criteria)


def test_with_a_champion_the_paired_delta_is_compared_and_named_in_order() -> None:
    d = run(binary(delta_ci=(-0.01, 0.03), champion="1"), require_superiority=True)
    assert [c.name for c in d.criteria] == BINARY_FLOORS + [NON_INF, SUP] + DATA
    assert d.champion_version == "1"
    assert d.failed == [SUP] and d.reason == f"failed: {SUP}"
    assert by_name(d)[NON_INF].threshold == "> -0.02" and by_name(d)[SUP].threshold == "> 0"


def test_the_delta_value_is_rounded_to_four_places() -> None:
    d = run(binary(delta_ci=(0.0123456, 0.05), champion="1"))
    assert by_name(d)[NON_INF].value == 0.0123 and d.promote


def test_a_champion_without_delta_fails_non_inferiority() -> None:
    d = run(binary(champion="1"))
    assert d.failed == [NON_INF] and by_name(d)[NON_INF].value is None


def test_decision_is_json_serialisable_and_keeps_inputs() -> None:
    evidence = binary(delta_ci=(0.01, 0.02), champion="1")
    evidence.inputs["test_images"] = 30
    d = run(evidence)
    out = json.loads(json.dumps(d.to_dict()))
    assert out["inputs"] == {"test_images": 30} and out["promote"] is True
    assert "KEEP CHAMPION" not in d.to_markdown() and "PROMOTE" in d.to_markdown()


# --------------------------------------------------------------------------- boundaries


def test_every_binary_criterion_passes_exactly_at_its_boundary() -> None:
    d = run(binary(auc=0.75, sens_ci=(0.7, 0.9), ece=0.2))
    assert d.promote, d.to_dict()


@pytest.mark.parametrize(("field", "evidence"), [
    ("auc_floor", binary(auc=math.nextafter(0.75, 0))),
    ("sensitivity_ci_low", binary(sens_ci=(math.nextafter(0.7, 0), 0.9))),
    ("ece", binary(ece=math.nextafter(0.2, 1))),
])
def test_just_beyond_a_binary_boundary_fails(field: str, evidence: Evidence) -> None:
    assert run(evidence).failed == [field]


def test_non_inferiority_is_strict_at_minus_margin() -> None:
    assert run(binary(delta_ci=(-0.02, 0.0), champion="1")).failed == [NON_INF]
    assert run(binary(delta_ci=(math.nextafter(-0.02, 0), 0.0), champion="1")).promote


def test_superiority_is_strict_at_zero() -> None:
    assert run(binary(delta_ci=(0.0, 0.0), champion="1"), require_superiority=True).failed == [SUP]
    assert run(binary(delta_ci=(5e-324, 0.1), champion="1"), require_superiority=True).promote


def test_accuracy_floor_passes_exactly_at_its_boundary() -> None:
    assert run(multiclass(accuracy=0.9)).promote
    assert run(multiclass(accuracy=math.nextafter(0.9, 0))).failed == ["accuracy_floor"]


# --------------------------------------------------------------------------- NaN, inf, None, missing


@pytest.mark.parametrize(("field", "evidence"), [
    ("auc_floor", binary(auc=NAN)),
    ("auc_floor", binary(auc=None)),
    ("auc_floor", binary(auc=-INF)),
    ("sensitivity_ci_low", binary(sens_ci=(NAN, NAN))),
    ("sensitivity_ci_low", binary(sens_ci=(None, None))),
    ("sensitivity_ci_low", binary(sens_ci=())),
    ("sensitivity_ci_low", binary(sens_ci=None)),
    ("ece", binary(ece=NAN)),
    ("ece", binary(ece=None)),
    ("ece", binary(ece=INF)),
], ids=["auc-nan", "auc-none", "auc-neg-inf", "sens-nan-interval", "sens-none-interval", "sens-empty-interval",
        "sens-no-interval", "ece-nan", "ece-none", "ece-inf"])
def test_undefined_values_fail_their_criterion(field: str, evidence: Evidence) -> None:
    d = run(evidence)
    assert d.failed == [field] and not d.promote


def test_a_zero_width_interval_is_judged_by_its_value() -> None:
    assert run(binary(sens_ci=(0.8, 0.8))).promote
    assert run(binary(sens_ci=(0.6, 0.6))).failed == ["sensitivity_ci_low"]


def test_missing_metrics_fail_instead_of_raising() -> None:
    d = decide(Evidence("binary", {}, {}, GOOD_DATA), cfg(), model="m", challenger_version="2")
    assert d.failed == BINARY_FLOORS
    assert all(c.value is None for c in d.criteria[:3])


@pytest.mark.parametrize("low", [NAN, -INF, None], ids=["nan", "neg-inf", "none"])
def test_an_undefined_delta_fails_non_inferiority_and_superiority(low: Any) -> None:
    d = run(binary(delta_ci=(low, 0.1), champion="1"), require_superiority=True)
    assert d.failed == [NON_INF, SUP]


def test_an_empty_delta_interval_fails() -> None:
    assert run(binary(delta_ci=(), champion="1")).failed == [NON_INF]


def test_multiclass_nan_or_missing_accuracy_fails() -> None:
    assert run(multiclass(accuracy=NAN)).failed == ["accuracy_floor"]
    assert run(multiclass(accuracy=None)).failed == ["accuracy_floor"]


# --------------------------------------------------------------------------- multi-class


def test_multiclass_uses_the_accuracy_floor_and_the_paired_accuracy_delta() -> None:
    d = run(multiclass(delta_ci=(-0.01, 0.02), champion="1"), require_superiority=True)
    names = [c.name for c in d.criteria]
    assert names == ["accuracy_floor", "delta_accuracy_ci_low (non-inferiority)",
                     "delta_accuracy_ci_low (superiority)", *DATA]
    assert d.failed == ["delta_accuracy_ci_low (superiority)"]
    assert not any(n in names for n in BINARY_FLOORS)


def test_multiclass_worse_than_the_margin_is_rejected() -> None:
    d = run(multiclass(delta_ci=(-0.05, -0.01), champion="1"))
    assert d.failed == ["delta_accuracy_ci_low (non-inferiority)"]


# --------------------------------------------------------------------------- data criteria


@pytest.mark.parametrize(("data", "failed"), [
    (DataChecks(False, None, True, True, True, True), ["split_patient_overlap", "split_certificate_match"]),
    (DataChecks(True, 3, True, True, True, True), ["split_patient_overlap"]),
    (DataChecks(True, 0, False, True, True, True), ["split_certificate_match"]),
    (DataChecks(True, 0, True, False, True, True), ["data_validation"]),
    (DataChecks(True, 0, True, True, False, True), ["split_manifest_match"]),
    (DataChecks(True, 0, True, True, True, False), ["validation_manifest_match"]),
    (DataChecks(False, None, False, False, False, False), DATA),
], ids=["no-certificate", "overlap", "other-split", "validation-failed", "split-of-another-manifest",
        "validation-of-another-manifest", "all"])
def test_failing_data_checks_block_promotion(data: DataChecks, failed: list[str]) -> None:
    d = run(binary(data=data))
    assert d.failed == failed and not d.promote
    assert d.reason.startswith("failed: " + ", ".join(failed))


def test_data_check_values_are_recorded() -> None:
    d = by_name(run(binary(data=DataChecks(True, 3, False, False, False, True))))
    assert d["split_patient_overlap"].value == 3
    assert d["split_certificate_match"].value is False and d["data_validation"].value is False
    assert d["split_manifest_match"].value is False and d["validation_manifest_match"].value is True


# --------------------------------------------------------------------------- purity


def test_the_decision_module_needs_neither_mlflow_nor_tensorflow() -> None:
    code = ("import sys; import pipeline.registry.decision; "
            "print(sorted(m for m in ('mlflow', 'tensorflow', 'keras', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
