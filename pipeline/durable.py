"""Durable writes: flush a file or a folder's entries to disk before (or after) a rename publishes it.

One helper for every writer that publishes by rename (dataset manifests and summaries, production-log
parts, the pseudonymisation salt): without it a crash after the rename can leave a name that points
at data the disk never received.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """``fsync`` a file, or a folder (its entries: a rename or link inside it), by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
