"""Advisory file locks that keep overlapping runs of one project from mixing their writes.

Two runs of the training flow may overlap (a schedule and a manual run, a drift trigger).
They write the same folders — the raw cohort (generation, ``dvc add``), the dataset folder
(images, manifest, quarantine, summary) — and move the same registry aliases. Each such
writer holds an exclusive ``fcntl.flock`` on a lock file for the whole write; a second
writer polls for it for at most ``timeout_s`` seconds, then fails with the caller's
``busy`` error (:class:`~pipeline.errors.DatasetBusy`, :class:`~pipeline.errors.RegistryBusy`)
naming the holder's pid (written into the lock file while held).

``flock`` locks belong to the open file: the kernel releases them when the holder's
process ends, however it ends (``kill -9`` included), so a crash never leaves a stale
lock. They also exclude two threads of one process that open the file separately. On
NFS, Linux maps ``flock`` to byte-range locks, which the server arbitrates. A thread that
already holds a lock may take it again (nested ``with``): only the outermost releases it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DatasetBusy, XrayopsError

logger = logging.getLogger(__name__)

POLL_S = 0.1
_held = threading.local()  # lock files this thread holds


@contextmanager
def file_lock(path: Path, *, what: str, timeout_s: float, setting: str,
              busy: type[XrayopsError] = DatasetBusy, reentrant: bool = True,
              poll_s: float = POLL_S) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Args:
        path: the lock file.
        what: what the lock protects, in words, for messages ("dataset folder /x").
        timeout_s: how long to wait for another holder; 0 = do not wait.
        setting: the setting that bounds the wait (named in the error's hint).
        busy: the error raised when the wait runs out.
        reentrant: a thread that holds the lock may enter again (False: it waits like anyone else).
        poll_s: how often a waiter tries again (short for locks held only milliseconds).

    Raises:
        busy: another process (or another open of the file) held it for ``timeout_s``.
    """
    key = os.path.abspath(path)
    held = _held.__dict__.setdefault("paths", set())
    if reentrant and key in held:  # this thread holds it already (e.g. a flow task around ingest_records)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, what, timeout_s, setting, busy, poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n".encode(), 0)
        if reentrant:
            held.add(key)
        try:
            yield
        finally:
            if reentrant:
                held.discard(key)
            os.ftruncate(fd, 0)  # the holder line goes with the holder (a crash leaves it: harmless)
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, path: Path, what: str, timeout_s: float, setting: str, busy: type[XrayopsError],
             poll_s: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = holder_of(path)
            if time.monotonic() >= deadline:
                raise busy(
                    f"{what} is held by another writer ({holder}; lock file {path}); waited {timeout_s:g} s",
                    hint=f"wait for that run to finish (or stop it), or raise {setting} to wait longer",
                ) from None
            if not announced:
                logger.info("waiting up to %g s for %s: another run holds it (%s)", timeout_s, what, holder)
                announced = True
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def holder_of(path: Path) -> str:
    """The holder line of a lock file ("pid N on HOST since ..."), or a placeholder while it is written."""
    try:
        line = path.read_text().strip()
    except OSError:
        line = ""
    return line or "pid unknown: the holder has not written it yet"
