"""A training process killed mid-run resumes from its last finished epoch into the same MLflow run; a live
run's checkpoint folder is never taken over by an identical run started meanwhile."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import Settings

pytestmark = pytest.mark.slow

EPOCHS = 12


def _train_cmd(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--params", str(settings.root / "params.yaml")]


def _wait_for_backup(proc: subprocess.Popen[bytes], home: Path, timeout: float = 120) -> int:
    """Block until some epoch has been backed up; return that epoch count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for meta in home.glob("checkpoints/*/*/backup/training_metadata.json"):
            try:
                epoch = json.loads(meta.read_text())["epoch"]
            except (ValueError, OSError):
                continue
            if epoch >= 1:
                return epoch
        if proc.poll() is not None:
            pytest.fail(f"training finished (rc={proc.returncode}) before it could be interrupted")
        time.sleep(0.01)
    pytest.fail("no backup appeared")


def test_killed_training_resumes_and_finishes_in_the_same_run(train_settings: Callable[..., Settings]) -> None:
    settings = train_settings(f"train.epochs={EPOCHS}", "train.early_stopping_patience=100",
                              "train.reduce_lr_patience=100", "train.image_size=48")
    env = {**os.environ, "XRAYOPS_PARAMS": str(settings.root / "params.yaml")}
    first = subprocess.Popen(_train_cmd(settings), cwd=settings.root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_backup(first, settings.home)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(30)
    assert first.returncode == -signal.SIGKILL
    assert not (settings.model_dir / "train.json").exists(), "the killed run must not have finished"

    second = subprocess.run(_train_cmd(settings), cwd=settings.root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(settings.experiment_name).experiment_id])
    assert len(runs) == 1, "the rerun must continue the interrupted MLflow run, not start another"
    run = runs[0]
    resumed_from = int(run.data.tags["resumed_from_epoch"])
    assert 1 <= resumed_from < EPOCHS
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(EPOCHS)), "every epoch is in the run, before and after the kill"

    record = json.loads((settings.model_dir / "train.json").read_text())
    assert record["run_id"] == run.info.run_id and record["epochs_run"] == EPOCHS
    assert not list(settings.home.glob("checkpoints/*/*")), "checkpoints are removed once training finished"


def test_identical_run_never_takes_over_a_live_runs_folder(train_settings: Callable[..., Settings]) -> None:
    """Before: the second identical run found the live run's run.json, logged into its MLflow run and deleted
    its backups at the end. Now the live run's folder is locked (held here, as a training process holds it)."""
    from pipeline.tracking import ensure_experiment
    from pipeline.training.train import _prepare, run_fingerprint, run_train

    settings = train_settings()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    live_run = client.create_run(ensure_experiment(settings)).info.run_id
    dataset = _prepare(settings, settings.dataset_dir, None)["dataset"]
    live = settings.home / "checkpoints" / settings.dataset_name / f"{settings.train.model}-" \
        f"{run_fingerprint(settings, dataset)}"
    (live / "backup").mkdir(parents=True)
    (live / "run.json").write_text(json.dumps({"run_id": live_run}))
    (live / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 3}))
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the live run holds its folder
        result = run_train(settings)
    finally:
        os.close(fd)

    assert result.run_id != live_run, "the second run logged into the live run's MLflow run"
    untouched = client.get_run(live_run)
    assert not untouched.data.params and not untouched.data.metrics
    assert "resumed_from_epoch" not in untouched.data.tags and untouched.info.status == "RUNNING"
    assert json.loads((live / "run.json").read_text())["run_id"] == live_run, "the live run's state was deleted"
    assert json.loads((live / "backup" / "training_metadata.json").read_text())["epoch"] == 3
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert sorted(p.name for p in live.parent.iterdir()) == [live.name], "the second run's folder is removed"
