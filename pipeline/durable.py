"""Durable writes: flush a file or a folder's entries to disk before (or after) a rename publishes it.

One helper for every writer that publishes by rename (dataset manifests and summaries, production-log
parts, the pseudonymisation salt): without it a crash after the rename can leave a name that points
at data the disk never received.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_path(path: Path) -> None:
    """``fsync`` a file, or a folder (its entries: a rename or link inside it), by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, data: bytes, *, mode: int = 0o644, temp_suffix: str = ".tmp") -> Path:
    """Publish ``data`` at ``dest`` whole or not at all: a hidden temporary file next to it (created with
    ``mode``, never over an existing one), fsync, rename, folder fsync. Returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{temp_suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(dest.parent)
    return dest
