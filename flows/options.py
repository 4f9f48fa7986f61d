"""Run-time task options taken from the ``orchestrate`` settings (retries, backoff, timeouts)."""

from __future__ import annotations

from typing import Any

from pipeline.config import Settings

RETRY_JITTER = 0.25  # ±25 % so that many runs retrying one server do not retry in lock-step


def backoff(first_delay_s: float, retries: int) -> list[float]:
    """Exponential backoff: first, 2×first, 4×first, …"""
    return [first_delay_s * 2**attempt for attempt in range(retries)]


def io_options(settings: Settings) -> dict[str, Any]:
    """``Task.with_options`` keywords for tasks that talk to DVC remotes or the MLflow server."""
    o = settings.orchestrate
    return {
        "retries": o.task_retries,
        "retry_delay_seconds": backoff(o.task_retry_delay_s, o.task_retries) or 0,
        "retry_jitter_factor": RETRY_JITTER if o.task_retries else None,
        "timeout_seconds": o.task_timeout_s,
    }
