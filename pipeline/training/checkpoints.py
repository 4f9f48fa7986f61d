"""Checkpoint folders of training runs: one folder per live run, held under an exclusive lock.

A run trains in ``<home>/checkpoints/<dataset>/<name>`` where ``name`` is the model and the run
fingerprint (same data + train config + seed → same name; see ``train.run_fingerprint``). While it
trains, the process holds an ``fcntl.flock`` on that folder. A new run with the same name takes the
first folder whose lock is free: ``<name>``, ``<name>.2``, ``<name>.3``, …

- A free folder that still holds files is an interrupted run: the new run adopts it and resumes
  (Keras ``BackupAndRestore`` + the MLflow run named in ``run.json``).
- A locked folder belongs to a live run: it is never adopted, never cleaned; the new run goes on to
  the next folder (and logs which process holds the one it skipped).

The lock goes with the process: a killed run's folder is free at once (no stale lock files). On
success the owner removes its folder while still holding the lock; a process that was about to
take it notices (the path no longer names the inode it locked) and looks again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import CheckpointError

logger = logging.getLogger(__name__)

OWNER_FILE = "owner.json"  # pid/host of the process that holds (or last held) the folder, for messages
MAX_SLOTS = 100


@dataclass(frozen=True)
class CheckpointDir:
    """A checkpoint folder this process holds the lock of."""

    path: Path
    adopted: bool  # it already held files: an interrupted run's state, resumed from


def slot_path(parent: Path, name: str, index: int) -> Path:
    """The ``index``-th folder (1-based) of runs named ``name``."""
    return parent / (name if index == 1 else f"{name}.{index}")


_GONE = -1  # _try_lock: the folder was removed (by its finishing owner) while we looked


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock; None when a live process holds it;
    ``_GONE`` when the folder went away meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return _GONE
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise CheckpointError(f"cannot lock the checkpoint folder {path}: {exc.strerror}",
                            hint="the checkpoint folder (under paths.home) must be on a file system with "
                                 "flock support") from None
    try:
        current = os.stat(path)
    except FileNotFoundError:
        current = None
    locked = os.fstat(fd)
    if current is None or (current.st_dev, current.st_ino) != (locked.st_dev, locked.st_ino):
        os.close(fd)  # the owner removed the folder after we opened it: that lock is on a dead inode
        return _GONE
    return fd


def owner_of(path: Path) -> str:
    """Who holds (or last held) ``path``, in words."""
    try:
        owner = json.loads((path / OWNER_FILE).read_text())
        return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _lock_slot(path: Path) -> int | None:
    """Create ``path`` if needed and lock it; None when a live run holds it."""
    for _ in range(10):
        path.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(path)
        if fd != _GONE:
            return fd
    raise CheckpointError(f"checkpoint folder {path} keeps disappearing while it is being locked",
                          hint="something else removes folders under paths.home/checkpoints; stop it")


def _claim(parent: Path, name: str) -> tuple[Path, int, bool]:
    for index in range(1, MAX_SLOTS + 1):
        path = slot_path(parent, name, index)
        fd = _lock_slot(path)
        if fd is None:
            logger.warning("checkpoint folder %s belongs to a live run (%s): not adopting it, this run "
                           "uses the next folder", path, owner_of(path))
            continue
        adopted = any(p.name != OWNER_FILE for p in path.iterdir())
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (path / OWNER_FILE).write_text(json.dumps(owner))
        return path, fd, adopted
    raise CheckpointError(f"all {MAX_SLOTS} checkpoint folders {parent / name}[.N] are held by live runs",
                        hint="wait for those trainings to end (or stop them); identical runs share a name")


@contextmanager
def claim_checkpoint_dir(parent: Path, name: str) -> Iterator[CheckpointDir]:
    """Hold the first free checkpoint folder of runs named ``name`` for the duration of the block.

    On a normal exit the folder is removed (training finished); on an exception it stays, unlocked,
    for an identical re-run to resume from.
    """
    path, fd, adopted = _claim(parent, name)
    ok = False
    try:
        yield CheckpointDir(path, adopted)
        ok = True
    finally:
        if ok:
            shutil.rmtree(path, ignore_errors=True)  # still locked: nobody adopts a half-removed folder
        os.close(fd)
