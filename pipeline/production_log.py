"""Append-only prediction log: partitioned Parquet (``date=YYYY-MM-DD/part-*.parquet``).

Each append writes one new file atomically (temporary name, then rename), so readers
never see half-written data and concurrent writers never collide. No PHI and no
pixels: rows hold request metadata, image features, embedding components and outputs.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd


def append(log_dir: Path, rows: pd.DataFrame) -> Path | None:
    """Append ``rows`` (must include a ``request_time`` column, UTC) as one new Parquet file."""
    if rows.empty:
        return None
    day = pd.Timestamp(rows["request_time"].iloc[0]).strftime("%Y-%m-%d")
    part_dir = log_dir / f"date={day}"
    part_dir.mkdir(parents=True, exist_ok=True)
    name = f"part-{datetime.now(UTC).strftime('%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = part_dir / f".{name}.tmp"
    rows.to_parquet(tmp, index=False)
    os.replace(tmp, part_dir / name)
    return part_dir / name


def read(log_dir: Path, *, last_k: int | None = None, hours: float | None = None) -> pd.DataFrame:
    """Rows of the current window: the last ``hours`` hours, else the last ``last_k`` rows."""
    files = sorted(log_dir.glob("date=*/part-*.parquet"))
    if hours is not None:
        since = datetime.now(UTC) - timedelta(hours=hours)
        files = [f for f in files if f.parent.name >= f"date={since:%Y-%m-%d}"]
    if not files:
        return pd.DataFrame()
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    df["request_time"] = pd.to_datetime(df["request_time"], utc=True)
    df = df.sort_values("request_time", kind="stable").reset_index(drop=True)
    if hours is not None:
        return df[df["request_time"] >= pd.Timestamp(since)].reset_index(drop=True)
    return df.tail(last_k).reset_index(drop=True) if last_k else df
