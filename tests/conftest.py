"""Shared fixtures: tiny temporary projects (params.yaml + git + DVC), synthetic cohorts, Prefect harness.

Every test that touches state gets its own project folder, so MLflow (SQLite), the DVC
remote, Prefect's home and all outputs live under ``tmp_path`` and nothing is shared.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.config import Settings, load_settings
from pipeline.runtime import quiet_tools

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds, big enough for a stratified patient split and a learnable model.
TINY = [
    "data.synthetic.n_patients=48",
    "data.synthetic.images_per_patient=[1, 3]",
    "data.synthetic.image_size=64",
    "data.synthetic.preset=easy",  # tests assert behaviour, not a cohort's difficulty
    "data.ingest.workers=2",
    "validate.min_rows=10",
    "train.image_size=64",
    "train.epochs=2",
    "train.batch_size=16",
    "evaluate.bootstrap_resamples=100",
    "monitor.simulate_rows=40",
    "monitor.min_rows=20",
]


@pytest.fixture(scope="session", autouse=True)
def _quiet_environment() -> None:
    quiet_tools()
    # `import dvc` binds DVC's log handlers to sys.stdout/stderr as they are at that moment. Imported first
    # inside a test that swaps them (typer's CliRunner, capsys), the handlers keep that test's stream, which is
    # closed after it: every later DVC log line then fails ("I/O operation on closed file"). Import it here,
    # under the session's capture, whichever test a worker happens to run first.
    import dvc  # noqa: F401
    os.environ.setdefault("XRAYOPS_PSEUDONYM_SALT", "test-salt-not-secret-0123456789abcdef")  # >= 32 bytes


def write_params(root: Path, overrides: list[str] | None = None) -> Path:
    """Copy the project's params.yaml into ``root`` with overrides applied (validated)."""
    from pipeline.config import apply_overrides

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = apply_overrides(params, overrides or [])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """``make_settings(*overrides, tiny=True)`` → Settings of a fresh project under ``tmp_path``."""

    def factory(*overrides: str, tiny: bool = True) -> Settings:
        path = write_params(tmp_path, [*(TINY if tiny else []), *overrides])
        return load_settings(path)

    return factory


def init_git_dvc(root: Path) -> None:
    """Make ``root`` a git + DVC repository (analytics off), with one initial commit."""
    from dvc.repo import Repo

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "test@example.com")
    git("config", "user.name", "test")
    Repo.init(str(root))
    with Repo(str(root)) as repo, repo.config.edit() as conf:
        conf["core"]["analytics"] = False
        conf["core"]["check_update"] = False
    git("add", "-A")
    git("commit", "-qm", "init")


@pytest.fixture
def dvc_project(tmp_path: Path, make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Like ``make_settings`` but the project is also a git + DVC repository."""
    init_git_dvc(tmp_path)
    return make_settings


@pytest.fixture
def cohort(make_settings: Callable[..., Settings]) -> Settings:
    """Settings of a tiny project whose synthetic cohort is generated and ingested (no DVC)."""
    from pipeline.data.ingest import prepare_raw, run_ingest

    settings = make_settings("data.version_with_dvc=false")
    prepare_raw(settings)
    run_ingest(settings, show_progress=False)
    return settings


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the whole session (≈ 15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def train_champion(root: Path, overrides: list[str] | None = None) -> Settings:
    """A tiny project under ``root`` with a trained model registered as ``champion`` (real path: ingest → validate →
    split → train → evaluate → reference profile with embedding PCA → register with ONNX export → lenient gate →
    alias)."""
    from pipeline.data.ingest import prepare_raw, run_ingest
    from pipeline.data.split import run_split
    from pipeline.data.validate import run_validation
    from pipeline.evaluation.evaluate import run_evaluate
    from pipeline.job import log_reference_profile
    from pipeline.registry.promote import promote_challenger
    from pipeline.training.train import run_train

    lenient = ["promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1"]
    settings = load_settings(write_params(root, [*TINY, "data.version_with_dvc=false", *lenient, *(overrides or [])]))
    prepare_raw(settings)
    run_ingest(settings, show_progress=False)
    run_validation(settings)
    run_split(settings)
    trained = run_train(settings)
    evaluation = run_evaluate(settings, trained)
    log_reference_profile(settings, trained, evaluation)
    result = promote_challenger(settings, trained, evaluation)
    assert result.promoted, (result.decision.reason, result.promotion)
    return settings


@pytest.fixture(scope="session")
def champion_project(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Session-wide tiny project whose trained model is the registered ``champion`` (≈ 15 s once).

    Tests that write logs should point ``paths.production_log`` / ``paths.feedback_log`` at their own
    ``tmp_path`` with :func:`pipeline.config.with_overrides`.
    """
    return train_champion(tmp_path_factory.mktemp("champion"))
