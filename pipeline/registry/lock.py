"""One writer of a registered model's aliases at a time.

Every alias move (promotion, approval, rollback) runs inside :func:`alias_lock`: it re-reads the
aliases, decides, writes and reads them back while no other writer can interleave. The default
lock is an exclusive ``fcntl.flock`` on ``<dir>/locks/registry-<model>.lock``, where ``<dir>``
is the folder of the SQLite registry database (the default store lives in ``paths.home``) or,
for a registry server, ``paths.home``. ``flock`` excludes other processes and other threads
that open the file separately, and the kernel drops it when its holder dies (``kill -9``
included), so a crash never leaves a stale lock.

A file lock covers one machine. For a registry other machines may write to (an MLflow server,
``http(s)://``, or a database such as ``postgresql://``: anything but a local SQLite file or file
store, :func:`shared_registry`) the caller adds a lock of its own: the flows and the CLI take the
Prefect global concurrency limit named by ``promote.registry_write_limit`` around this one
(``flows/registry_lock.py``); the library never imports Prefect, so it takes that lock as a
context-manager factory (:data:`AliasLock`). Without one, an alias move on a shared registry is
refused (:func:`check_shared_lock`, fail closed): a file lock that other machines never see is no
lock, and two moves at once would lose a link of the ``previous-champion`` chain.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import Settings
from pipeline.connections import mask_uri
from pipeline.errors import ConfigError, RegistryBusy
from pipeline.locking import file_lock

logger = logging.getLogger(__name__)

#: A factory of the context manager that serialises alias writers (see :func:`alias_lock`).
AliasLock = Callable[[], AbstractContextManager[Any]]

POLL_S = 0.05


def lock_path(settings: Settings) -> Path:
    """The lock file of the registered model's aliases."""
    uri = settings.registry_uri
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else settings.home
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", settings.registered_model)
    return folder / "locks" / f"registry-{safe}.lock"


def registry_file_lock(settings: Settings) -> AbstractContextManager[None]:
    """Hold the registry's file lock for the ``with`` block (not reentrant: a nested move waits like any other).

    Raises:
        RegistryBusy: another writer held it for ``promote.registry_lock_timeout_s`` (its pid is named).
    """
    return file_lock(lock_path(settings), what="the registry's alias lock", busy=RegistryBusy, reentrant=False,
                     timeout_s=settings.promote.registry_lock_timeout_s, setting="promote.registry_lock_timeout_s")


#: URI schemes of registries that live in one machine's files (the file lock covers every writer)
LOCAL_SCHEMES = ("", "file", "sqlite")


def shared_registry(settings: Settings) -> bool:
    """Whether other machines may write to the registry: any URI but a local SQLite file or file store."""
    uri = settings.registry_uri
    if re.match(r"^[A-Za-z]:[\\/]", uri):  # a Windows drive path, not a scheme
        return False
    return urlsplit(uri).scheme.lower() not in LOCAL_SCHEMES


def check_shared_lock(settings: Settings, outer: AliasLock | None) -> None:
    """Refuse to move aliases of a shared registry (:func:`shared_registry`) without a lock all its writers take.

    Raises:
        ConfigError: the registry is shared and no outer lock (``promote.registry_write_limit``) was given.
    """
    if outer is not None or not shared_registry(settings):
        return
    name = settings.promote.registry_write_limit
    why = ("promote.registry_write_limit is null" if not name
           else f"the caller did not take promote.registry_write_limit ({name!r})")
    raise ConfigError(
        f"refusing to move aliases of {settings.registered_model}: the registry at {mask_uri(settings.registry_uri)} "
        f"is shared (other machines can write to it) and {why}, so this machine's file lock cannot keep two "
        "moves apart",
        hint="set promote.registry_write_limit: registry-write (params.yaml, or --set "
             "promote.registry_write_limit=registry-write) and create that Prefect limit once: "
             "`prefect gcl create registry-write --limit 1`")


@contextmanager
def alias_lock(settings: Settings, outer: AliasLock | None = None) -> Iterator[None]:
    """The registry file lock, inside ``outer()`` when given (e.g. a Prefect global concurrency limit).

    Raises:
        ConfigError: a shared registry and no ``outer`` lock (:func:`check_shared_lock`).
        RegistryBusy: a lock stayed taken for ``promote.registry_lock_timeout_s``.
    """
    check_shared_lock(settings, outer)
    if outer is None:
        with registry_file_lock(settings):
            yield
        return
    with outer(), registry_file_lock(settings):
        yield
