"""One writer of a registered model's aliases at a time.

Every alias move (promotion, approval, rollback) runs inside :func:`alias_lock`: it re-reads the
aliases, decides, writes and reads them back while no other writer can interleave. The default
lock is an exclusive ``fcntl.flock`` on ``<dir>/locks/registry-<model>.lock``, where ``<dir>``
is the folder of the SQLite registry database (the default store lives in ``paths.home``) or,
for a registry server, ``paths.home``. ``flock`` excludes other processes and other threads
that open the file separately, and the kernel drops it when its holder dies (``kill -9``
included), so a crash never leaves a stale lock.

A file lock covers one machine. For a registry server shared by several machines the caller
adds a lock of its own: the Prefect flows take the global concurrency limit named by
``promote.registry_write_limit`` around this one (``flows/training.py``); the library never
imports Prefect, so it takes that lock as a context-manager factory (:data:`AliasLock`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import RegistryBusy
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


@contextmanager
def alias_lock(settings: Settings, outer: AliasLock | None = None) -> Iterator[None]:
    """The registry file lock, inside ``outer()`` when given (e.g. a Prefect global concurrency limit)."""
    if outer is None:
        with registry_file_lock(settings):
            yield
        return
    with outer(), registry_file_lock(settings):
        yield
