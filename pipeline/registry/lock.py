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

import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import RegistryBusy

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


@contextmanager
def registry_file_lock(settings: Settings) -> Iterator[None]:
    """Hold the registry's file lock for the ``with`` block.

    Raises:
        RegistryBusy: another writer held it for ``promote.registry_lock_timeout_s`` (its pid is named).
    """
    path = lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, settings.promote.registry_lock_timeout_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = path.read_text(errors="replace").strip() or "holder unknown"
                raise RegistryBusy(
                    f"the registry's alias lock {path} is held by another writer ({holder}); waited {timeout_s:g} s",
                    hint="wait for that promotion, approval or rollback to finish (or stop it), or raise "
                         "promote.registry_lock_timeout_s") from None
            time.sleep(POLL_S)


@contextmanager
def alias_lock(settings: Settings, outer: AliasLock | None = None) -> Iterator[None]:
    """The registry file lock, inside ``outer()`` when given (e.g. a Prefect global concurrency limit)."""
    if outer is None:
        with registry_file_lock(settings):
            yield
        return
    with outer(), registry_file_lock(settings):
        yield
