"""A writer process of the concurrent-append test: imports only :mod:`pipeline.audit` (fast to spawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.audit import AuditLog


def append_many(path: str, writer: int, n: int, barrier: Any) -> None:
    """Wait for the other writers, then append ``n`` records tagged ``writer``."""
    barrier.wait()
    log = AuditLog(Path(path))
    for i in range(n):
        log.append("alias_move", model="m", version=i, details={"writer": writer, "i": i})
