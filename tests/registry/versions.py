"""Registry versions without models, for tests of alias moves, approval and rollback.

Alias moves, approval and rollback read only what is recorded on a version (its gate tags,
status, rollback tags), so these tests register versions whose gate verdict is written by hand
instead of training models. The fixtures ``registry`` / ``registry_store`` are in conftest.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient

from pipeline.config import Settings
from pipeline.registry.contract import CHAMPION, GateTags
from pipeline.registry.decision import DataChecks, Evidence, GateDecision, decide
from pipeline.registry.read import get_alias

PROMOTE = ["promote.export_onnx=false"]


def new_version(settings: Settings, *, gated_against: str | None = None, verdict: str = "pass") -> Any:
    """A registry version whose gate verdict is ``verdict``, decided against ``gated_against``."""
    from pipeline.tracking import configure_mlflow, ensure_experiment

    client = configure_mlflow(settings)
    run = client.create_run(ensure_experiment(settings))
    mv = client.create_model_version(settings.registered_model, source=f"runs:/{run.info.run_id}/model",
                                     run_id=run.info.run_id)
    gate_as(settings, mv.version, gated_against, verdict=verdict)
    return client.get_model_version(settings.registered_model, mv.version)


def gate_as(settings: Settings, version: Any, champion: str | None, *, verdict: str = "pass") -> None:
    tags = GateTags.of(promote=verdict == "pass", failed=[] if verdict == "pass" else ["auc_floor"],
                       decided_at=datetime.now(UTC).isoformat(timespec="seconds"), champion=champion,
                       reason="test").to_tags()
    client = MlflowClient(settings.tracking_uri, settings.registry_uri)
    for key, value in tags.items():
        client.set_model_version_tag(settings.registered_model, str(version), key, value)


def gate_against_current(settings: Settings, version: Any) -> GateDecision:
    """A passing decision of ``version`` against the champion of the moment, recorded like the gate does."""
    from pipeline.registry.write import record_decision

    champion = get_alias(settings, CHAMPION)
    evidence = Evidence("binary", {"auc": 0.99, "ece": 0.01}, {"sensitivity": [0.99, 1.0]},
                        DataChecks(True, 0, True, True, True, True),
                        str(champion.version) if champion is not None else None,
                        {"delta_auc": 0.01, "ci": [0.001, 0.02]})
    decision = decide(evidence, settings.promote, model=settings.registered_model,
                      challenger_version=str(version.version))
    record_decision(settings, version, decision, version.run_id)
    return decision
