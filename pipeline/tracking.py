"""MLflow access from configuration: URIs are always set explicitly, never taken from the cwd."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config import Settings

logger = logging.getLogger(__name__)


def configure_mlflow(settings: Settings) -> Any:
    """Point MLflow (process-wide, for its fluent API) at the configured tracking and registry URIs;
    returns an ``MlflowClient``."""
    import mlflow

    client = mlflow_client(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    return client


def mlflow_client(settings: Settings) -> Any:
    """An ``MlflowClient`` on the configured URIs that leaves MLflow's process-wide URIs alone.

    Use it for reads from background threads (the serving alias poller): changing the global
    URIs there would redirect whatever else runs in the process (a training run, a test).
    """
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=settings.registry_uri)


def ensure_experiment(settings: Settings, name: str | None = None) -> str:
    """Id of the experiment ``name`` (default: ``<project>/<dataset>``), created with the configured artifact root."""
    import mlflow

    client = configure_mlflow(settings)
    name = name or settings.experiment_name
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = settings.artifact_root
        location = f"{root.rstrip('/')}/{name.replace('/', '_')}" if root else None  # None: the server decides
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(name).experiment_id
        return str(exp_id)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return str(exp.experiment_id)


def code_version(root: Path) -> dict[str, str]:
    """Git commit, dirty flag and lock-file hash of the project (for run and version tags)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    lock = root / "uv.lock"
    return {
        "git_commit": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.exists() else "none",
    }


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged Keras model (explicit: inference by MLflow costs ~11 s)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("tensorflow", "keras", "numpy")]
