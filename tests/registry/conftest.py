"""Fixtures of the evaluation/registry tests: one small learnable project, trained once per session.

``gate_project`` holds a real trained model (AUC ≈ 0.99 on 30 test patients) and a real
untrained one of the same architecture, both logged to the project's temporary MLflow
(SQLite) and evaluated by the real stage functions. Each test registers them under its own
registered-model name, so tests share the expensive part and not the registry state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import Settings, load_settings, with_overrides
from tests.conftest import TINY, write_params

# Enough test patients (30) for a decisive paired bootstrap; still ≈ 20 s to build and train on 2 cores.
LEARNABLE = [
    *TINY,
    "data.version_with_dvc=false",
    "data.synthetic.n_patients=100",
    "data.synthetic.images_per_patient=[1, 2]",
    "data.synthetic.image_size=40",
    "train.image_size=40",
    "train.epochs=6",
    "split.fractions=[0.5, 0.2, 0.3]",
    # Floors not under test are lenient: a 6-epoch model's calibration and its sensitivity at a threshold
    # locked on 20 validation patients vary from run to run; its ranking (AUC ≈ 0.95-0.99) does not.
    "promote.max_ece=0.5",
    "promote.sensitivity_ci_floor=0",
    "promote.export_onnx=false",  # exports are tested on their own
    "promote.approval_poll_s=1",
]


@dataclass
class Candidate:
    trained: Any
    evaluation: Any


@dataclass
class GateProject:
    settings: Settings
    good: Candidate
    untrained: Candidate

    def named(self, *overrides: str) -> Settings:
        """Settings with a registered-model name of its own (plus overrides)."""
        name = f"xr-{uuid.uuid4().hex[:8]}"
        return with_overrides(self.settings, [f"promote.registered_model={name}", *overrides])


def untrained_candidate(settings: Settings, like: Any) -> Candidate:
    """The architecture of ``like`` with its initial (random) weights, logged and evaluated for real."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline.evaluation.evaluate import run_evaluate
    from pipeline.tracking import configure_mlflow, ensure_experiment, pip_requirements
    from pipeline.training.models import build_model

    client = configure_mlflow(settings)
    model = build_model(like.model_name, image_size=like.input["image_size"], channels=like.input["channels"],
                        num_classes=len(like.classes))
    sample = np.zeros((2, like.input["image_size"], like.input["image_size"], like.input["channels"]), np.float32)
    run = client.create_run(ensure_experiment(settings), run_name="untrained", tags={"stage": "test-untrained"})
    with mlflow.start_run(run_id=run.info.run_id):
        info = mlflow.keras.log_model(model, name="model", pip_requirements=pip_requirements(),
                                      signature=infer_signature(sample, np.asarray(model(sample))))
    trained = replace(like, run_id=run.info.run_id, model_uri=str(info.model_uri), model=model, history={},
                      epochs_run=0)
    return Candidate(trained, run_evaluate(settings, trained))


@pytest.fixture(scope="session")
def gate_project(tmp_path_factory: pytest.TempPathFactory) -> GateProject:
    from pipeline.data.ingest import prepare_raw, run_ingest
    from pipeline.data.split import run_split
    from pipeline.data.validate import run_validation
    from pipeline.evaluation.evaluate import run_evaluate
    from pipeline.training.train import run_train

    root: Path = tmp_path_factory.mktemp("gate-project")
    settings = load_settings(write_params(root, LEARNABLE))
    prepare_raw(settings)
    run_ingest(settings, show_progress=False)
    run_validation(settings)
    run_split(settings)
    trained = run_train(settings)
    good = Candidate(trained, run_evaluate(settings, trained))
    assert good.evaluation.metrics["auc"] >= 0.85, f"fixture model did not learn: {good.evaluation.metrics}"
    return GateProject(settings, good, untrained_candidate(settings, trained))


@pytest.fixture
def register_and_gate() -> Callable[..., tuple[Any, Any]]:
    """``register_and_gate(settings, candidate)`` → (version, decision), recorded like the flow does."""
    from pipeline.registry.promote import promote_challenger

    def run(settings: Settings, candidate: Candidate) -> tuple[Any, Any]:
        result = promote_challenger(settings, candidate.trained, candidate.evaluation, move_aliases=False)
        return result.version, result.decision

    return run


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One temporary project and SQLite registry per test module (creating the database takes seconds)."""
    from pipeline.registry.read import aliases
    from tests.registry.versions import PROMOTE

    settings = load_settings(write_params(tmp_path_factory.mktemp("registry"), [*TINY, *PROMOTE]))
    aliases(settings)  # creates the database
    return settings


@pytest.fixture
def registry(registry_store: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings whose registered model is new and exists (no versions yet); one name per test.

    Model cards are not written: the versions of tests/registry/versions.py have no evaluation to
    put on one (cards are tested with real versions in test_gate.py).
    """
    from pipeline.registry import write
    from pipeline.tracking import configure_mlflow

    monkeypatch.setattr(write, "publish_card", lambda settings, version: None)
    settings = with_overrides(registry_store, [f"promote.registered_model=xr-{uuid.uuid4().hex[:8]}"])
    configure_mlflow(settings).create_registered_model(settings.registered_model)
    return settings
