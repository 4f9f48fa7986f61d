"""MLflow access from configuration: URIs are always set explicitly, never taken from the cwd.

An http(s) tracking or registry server that does not answer fails fast (one request, a few
seconds, no retries) with :class:`~pipeline.errors.TrackingUnavailable` naming the fix, instead of
MLflow's minutes of retries; a password in a URI is masked (``user:***@``) wherever it is shown,
and in the run's params (:func:`loggable_params`) and tags.

A local SQLite store is created once per process, under a file lock next to the database
(:func:`ensure_sqlite_store`): MLflow creates a missing schema on first open without any lock
across processes, so runs started at once in a fresh project crashed in each other's
migrations ("table ... already exists", "duplicate column name").
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import Settings
from pipeline.connections import connection_reason, exception_chain, mask_uri
from pipeline.errors import RegistryBusy, TrackingUnavailable, XrayopsError
from pipeline.locking import file_lock

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0  # connect (and read) timeout of the reachability check of an http(s) server
_ANSWERED: set[str] = set()  # http(s) servers that answered in this process (checked once)
_CREATED: set[str] = set()  # sqlite:/// stores whose schema this process has seen complete
INIT_LOCK_NAME = ".mlflow-init.lock"  # beside the database file


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
    for store in dict.fromkeys((uri, settings.registry_uri)):
        ensure_sqlite_store(store, timeout_s=settings.promote.registry_lock_timeout_s)
    check_server(uri, "paths.mlflow_tracking_uri")
    if settings.registry_uri != uri:
        check_server(settings.registry_uri, "paths.mlflow_registry_uri")
    return MlflowClient(tracking_uri=uri, registry_uri=settings.registry_uri)


def ensure_sqlite_store(uri: str, *, timeout_s: float = 120.0) -> None:
    """Create the schema of the local SQLite MLflow store ``uri`` if it is missing, one process at a time.

    MLflow's stores create a missing schema when first opened (create tables, then alembic
    migrations), with nothing that excludes another process doing the same: three runs started
    at once on a fresh database crashed two of three. Here the check and the creation run under
    an exclusive lock on ``<db folder>/.mlflow-init.lock``, held only for that; a process that
    waited finds the schema complete and creates nothing. Once seen complete, a store is not
    checked again in this process. Other URIs (servers) are left alone: a server migrates its
    own database. An out-of-date schema is not upgraded here (MLflow refuses to open it and
    names `mlflow db upgrade`; back the database up first).

    Raises:
        RegistryBusy: another process held the lock for ``timeout_s`` (``promote.registry_lock_timeout_s``).
    """
    if not uri.startswith("sqlite:///") or uri in _CREATED:
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if str(path) in ("", ":memory:"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.store.db import utils as db_utils
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with file_lock(path.parent / INIT_LOCK_NAME, what=f"creation of the MLflow database {path}",
                   timeout_s=timeout_s, setting="promote.registry_lock_timeout_s", busy=RegistryBusy,
                   reentrant=False):
        engine = SqlAlchemyStore._get_or_create_engine(uri)  # the engine the stores reuse (cached per URI)
        if not db_utils._all_tables_exist(engine):
            logger.info("creating the MLflow database %s", path)
            db_utils._initialize_tables(engine)
    _CREATED.add(uri)


def check_server(uri: str, setting: str = "paths.mlflow_tracking_uri") -> None:
    """Fail fast when the http(s) MLflow server ``uri`` cannot be connected to (other URIs: nothing to check).

    One ``GET /health`` with :data:`HEALTH_TIMEOUT_S`, no retries. Any HTTP answer counts as
    reachable, and so do a TLS failure and a slow answer: authentication, certificates and API
    errors stay MLflow's to report. A server that answered once in this process is not asked again.

    Raises:
        TrackingUnavailable: the connection was refused, the host name does not resolve, or no
            connection within :data:`HEALTH_TIMEOUT_S`.
    """
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S)
    except (requests.exceptions.SSLError, requests.exceptions.ReadTimeout):
        pass  # something is listening
    except requests.exceptions.ConnectionError as exc:  # refused, unresolvable, connect timeout, proxy refused
        raise unreachable(uri, _reason(exc), setting) from None
    _ANSWERED.add(uri)


def unreachable(uri: str, reason: str, setting: str = "paths.mlflow_tracking_uri") -> TrackingUnavailable:
    """The error for an MLflow server at ``uri`` that does not answer, with how to start it or point elsewhere."""
    role = "registry" if setting.endswith("registry_uri") else "tracking"
    parts = urlsplit(uri)
    if parts.hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        start = (f"start it with `uv run mlflow server --host 127.0.0.1 --port "
                 f"{parts.port or (443 if parts.scheme == 'https' else 80)}`")
    else:
        start = "start it (`docker compose up -d mlflow` in infra/, see docs/operations.md)"
    return TrackingUnavailable(
        f"MLflow {role} server at {mask_uri(uri)} is not reachable ({reason})",
        hint=f"is it running? {start}, or set {setting} to a server that is (null = a local SQLite store "
             "under paths.home)")


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in words (see :func:`pipeline.connections.connection_reason`)."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no connection within {HEALTH_TIMEOUT_S:g} s"
    return connection_reason(exc)


@contextmanager
def tracking_errors(settings: Settings) -> Iterator[None]:
    """Turn MLflow's "server not there" failures (after its own retries) into :class:`TrackingUnavailable`.

    Other errors pass unchanged.
    """
    try:
        yield
    except XrayopsError:
        raise
    except Exception as exc:
        failed = _connection_failure(exc)
        if failed is None:
            raise
        registry = settings.registry_uri
        on_registry = registry != settings.tracking_uri and _same_server(failed, registry)
        raise unreachable(registry if on_registry else settings.tracking_uri, _reason(failed),
                          "paths.mlflow_registry_uri" if on_registry else "paths.mlflow_tracking_uri") from None


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The requests connection error (not a TLS failure) somewhere in ``exc``'s chain, or None."""
    try:
        import requests
    except ImportError:  # pragma: no cover - MLflow depends on requests
        return None
    for link in exception_chain(exc):
        if (isinstance(link, requests.exceptions.ConnectionError)
                and not isinstance(link, requests.exceptions.SSLError)):
            return link
    return None


def _same_server(exc: BaseException, uri: str) -> bool:
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    return bool(url) and urlsplit(str(url)).netloc == urlsplit(uri).netloc


def ensure_experiment(settings: Settings, name: str | None = None) -> str:
    """Id of the experiment ``name`` (default: ``<project>/<dataset>``), created with the configured artifact root."""
    import mlflow

    client = configure_mlflow(settings)
    name = name or settings.experiment_name
    with tracking_errors(settings):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            root = settings.artifact_root
            location = f"{root.rstrip('/')}/{name.replace('/', '_')}" if root else None  # None: the server decides
            try:
                exp_id = client.create_experiment(name, artifact_location=location)
            except mlflow.exceptions.MlflowException as exc:  # created concurrently
                if _connection_failure(exc) is not None:
                    raise
                exp_id = client.get_experiment_by_name(name).experiment_id
            return str(exp_id)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)


MAX_PARAM_CHARS = 500  # longer values are cut (MLflow's limit is larger, the UI's column is not)


def loggable_params(settings: Settings) -> dict[str, str]:
    """``settings.flat_params()`` as MLflow params: strings, ``""`` for null, a password in any URI-valued
    setting (tracking/registry/artifact URIs, DVC remote, data repo, Dask address, …) masked (``user:***@``)."""
    return {k: mask_uri("" if v is None else str(v))[:MAX_PARAM_CHARS] for k, v in settings.flat_params().items()}


def mask_secrets(value: Any) -> Any:
    """``value`` with every string in it (nested dicts, lists, tuples) passed through :func:`mask_uri`: for
    anything that is logged, printed or written for people (tags, summaries)."""
    if isinstance(value, str):
        return mask_uri(value)
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    if isinstance(value, tuple):
        return tuple(mask_secrets(v) for v in value)
    return value


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
