"""Fixtures of the model tier: one tiny ingested + split cohort per session, shared read-only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from tests.conftest import TINY, write_params

# Smaller and faster than the project-wide TINY: 32-px images, one epoch, no augmentation cost worth noting.
FAST = [*TINY, "data.synthetic.image_size=64", "train.image_size=32", "train.epochs=1", "train.batch_size=16",
        "data.version_with_dvc=false"]


@pytest.fixture(scope="session")
def split_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic cohort, ingested and split by patient (built once; do not modify)."""
    from pipeline.data.ingest import prepare_raw, run_ingest
    from pipeline.data.split import run_split

    root = tmp_path_factory.mktemp("cohort")
    settings = load_settings(write_params(root, FAST))
    prepare_raw(settings)
    run_ingest(settings, show_progress=False)
    run_split(settings)
    return settings.dataset_dir


@pytest.fixture
def train_settings(tmp_path: Path, split_dataset: Path) -> Callable[..., Settings]:
    """``train_settings(*overrides)``: a fresh project (own MLflow DB, home, outputs) reading the shared cohort."""

    def factory(*overrides: str) -> Settings:
        return load_settings(write_params(tmp_path, [*FAST, f"data.dataset_dir={split_dataset}", *overrides]))

    return factory
