"""The promotion gate on real tiny models in a temporary MLflow registry.

A trained model and an untrained one of the same architecture are registered under a
fresh registered-model name per test; the gate re-scores the champion on the same test
images and decides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.errors import PromotionError
from pipeline.registry.read import aliases, get_alias
from pipeline.registry.write import move_champion, rollback
from tests.registry.conftest import GateProject

pytestmark = pytest.mark.slow


def _crowned(project: GateProject, register_and_gate: Callable[..., Any], settings: Any, candidate: Any) -> Any:
    mv, decision = register_and_gate(settings, candidate)
    assert decision.promote, decision.reason
    move_champion(settings, mv.version, reason=decision.reason)
    return mv


def test_identical_challenger_is_not_promoted_under_superiority(gate_project: GateProject,
                                                                register_and_gate: Callable[..., Any]) -> None:
    settings = gate_project.named("promote.require_superiority=true")
    champion = _crowned(gate_project, register_and_gate, settings, gate_project.good)

    mv, decision = register_and_gate(settings, gate_project.good)

    assert not decision.promote
    assert decision.champion_version == str(champion.version)
    assert decision.failed == ["delta_auc_ci_low (superiority)"], decision.to_dict()
    delta = decision.inputs["paired_bootstrap"]
    assert delta["delta_auc"] == 0 and delta["ci"] == [0.0, 0.0]
    # the champion was re-scored on the same test images, not read from its tags
    assert decision.inputs["champion_rescored"]["auc"] == pytest.approx(gate_project.good.evaluation.metrics["auc"],
                                                                        abs=1e-4)
    assert aliases(settings)["champion"] == str(champion.version)
    tags = MlflowClient().get_model_version(settings.registered_model, mv.version).tags
    assert tags["gate_verdict"] == "fail" and tags["gate_failed"] == "delta_auc_ci_low (superiority)"
    with pytest.raises(PromotionError, match="gate verdict is 'fail'"):
        move_champion(settings, mv.version, reason="forced")


def test_worse_challenger_is_rejected_naming_the_failing_criteria(gate_project: GateProject,
                                                                  register_and_gate: Callable[..., Any]) -> None:
    settings = gate_project.named()
    champion = _crowned(gate_project, register_and_gate, settings, gate_project.good)

    _, decision = register_and_gate(settings, gate_project.untrained)

    assert not decision.promote
    assert "delta_auc_ci_low (non-inferiority)" in decision.failed
    assert "auc_floor" in decision.failed
    assert "delta_auc_ci_low (non-inferiority)" in decision.reason
    assert decision.inputs["paired_bootstrap"]["ci"][1] < 0
    assert aliases(settings)["champion"] == str(champion.version)


def test_without_champion_absolute_floors_still_apply(gate_project: GateProject,
                                                      register_and_gate: Callable[..., Any]) -> None:
    settings = gate_project.named("promote.max_ece=0.01")
    _, decision = register_and_gate(settings, gate_project.good)
    assert decision.champion_version is None
    assert decision.failed == ["ece"] and "no champion" in decision.reason
    assert get_alias(settings, "champion") is None


def test_better_challenger_is_promoted_and_rollback_restores_the_old_champion(
        gate_project: GateProject, register_and_gate: Callable[..., Any]) -> None:
    # an untrained model can only hold champion with lenient floors (e.g. a first model on a new dataset)
    settings = gate_project.named("promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1",
                                  "promote.require_superiority=true")
    old = _crowned(gate_project, register_and_gate, settings, gate_project.untrained)

    new, decision = register_and_gate(settings, gate_project.good)
    assert decision.promote, decision.to_dict()
    assert decision.inputs["paired_bootstrap"]["ci"][0] > 0
    moved = move_champion(settings, new.version, reason=decision.reason)

    assert moved == {"champion": str(new.version), "previous-champion": str(old.version)}
    assert aliases(settings) == {"champion": str(new.version), "previous-champion": str(old.version),
                                 "challenger": str(new.version)}

    record = rollback(settings, reason="sensitivity complaints from ward 3", actor="dr-test")
    assert record["from_version"] == str(new.version) and record["to_version"] == str(old.version)
    now = aliases(settings)
    assert now["champion"] == str(old.version) and "previous-champion" not in now
    client = MlflowClient()
    rolled = client.get_model_version(settings.registered_model, new.version)
    assert rolled.tags["rolled_back_by"] == "dr-test" and "Rolled back" in rolled.description
    audit = client.list_artifacts(rolled.run_id, "registry")
    assert any(a.path.startswith("registry/rollback-") for a in audit)
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        rollback(settings, reason="again", actor="dr-test")


def test_registration_records_lineage_threshold_gradcam_and_model_card(
        gate_project: GateProject, register_and_gate: Callable[..., Any]) -> None:
    settings = gate_project.named()
    mv, decision = register_and_gate(settings, gate_project.good)
    tags = MlflowClient().get_model_version(settings.registered_model, mv.version).tags
    cert = json.loads((settings.dataset_dir / "split_certificate.json").read_text())
    assert tags["split_certificate"] == cert["certificate_sha256"]
    for key in ("git_commit", "lock_sha256", "seed", "dvc_md5", "operating_threshold", "threshold_policy",
                "test_auc", "test_sensitivity", "gradcam_sanity", "gradcam_sanity_rank_corr", "export_saved_model"):
        assert key in tags, key
    assert float(tags["operating_threshold"]) == pytest.approx(
        gate_project.good.evaluation.operating_point["threshold"], abs=1e-6)
    assert "[" in tags["test_auc"]  # value with its CI
    assert aliases(settings)["challenger"] == str(mv.version)
    card = settings.reports_dir / "model_cards" / f"{settings.registered_model}-v{mv.version}.md"
    text = card.read_text()
    for section in ("Intended use", "## Data", "## Split", "Performance", "Per-slice", "Operating point",
                    "Calibration", "Explainability", "Promotion", "Known limitations"):
        assert section in text, section
    from pipeline.data.manifest import read_manifest

    published = json.dumps(decision.to_dict()) + text + json.dumps(tags)
    raw_ids = pd.read_csv(settings.raw_dir / "patients.csv", dtype=str)["patient_id"].unique()
    pseudonyms = read_manifest(settings.dataset_dir)["patient_id"].unique()
    leaked = [p for p in [*raw_ids, *pseudonyms] if str(p) in published]
    assert not leaked, "patient identifiers must not reach the registry or the model card"
    assert "Model card:" in MlflowClient().get_model_version(settings.registered_model, mv.version).description


def test_cli_registry_show_approve_and_rollback(gate_project: GateProject,
                                                register_and_gate: Callable[..., Any]) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    settings = gate_project.named("promote.require_approval=true")
    v1, _ = register_and_gate(settings, gate_project.good)
    v2, _ = register_and_gate(settings, gate_project.untrained)
    cli = ["--params", str(settings.root / "params.yaml"), "--set",
           f"promote.registered_model={settings.registered_model}", "--set", "promote.require_approval=true"]
    runner = CliRunner()

    refused = runner.invoke(app, ["registry", "approve", str(v2.version), "--reviewer", "dr-cli", *cli])
    assert refused.exit_code == 2 and "did not pass the promotion gate" in refused.output
    approved = runner.invoke(app, ["registry", "approve", str(v1.version), "--reviewer", "dr-cli", *cli])
    assert approved.exit_code == 0, approved.output
    assert aliases(settings)["champion"] == str(v1.version)

    shown = runner.invoke(app, ["registry", "show", "--json", *cli])
    assert shown.exit_code == 0, shown.output
    rows = {r["version"]: r for r in json.loads(shown.output)["versions"]}
    assert rows[str(v1.version)]["aliases"] == ["champion"] and rows[str(v1.version)]["approval"] == "approved"
    assert rows[str(v2.version)]["gate"] == "fail" and "auc_floor" in rows[str(v2.version)]["failed"]
    table = runner.invoke(app, ["registry", "show", *cli])
    assert table.exit_code == 0 and "champion" in table.output and "auc_floor" in table.output

    card = runner.invoke(app, ["registry", "card", str(v1.version), *cli])
    assert card.exit_code == 0 and f"# Model card — {settings.registered_model} v{v1.version}" in card.output
    assert "Human approval: **approved** by dr-cli" in card.output

    nothing = runner.invoke(app, ["registry", "rollback", "--reason", "test", *cli])
    assert nothing.exit_code == 2 and "nothing to roll back to" in nothing.output
