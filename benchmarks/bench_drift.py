"""Drift-report wall time for 10k and 100k production rows.

    flock /tmp/xrayops-heavy.lock uv run python benchmarks/bench_drift.py [--rows 10000,100000]

A production log is written the way the API writes it (``LogWriter`` flushes: one Parquet file
per 1,000 rows; N rows served by version 1, then N by version 2 after the alias moved), with the
project's real columns (12 image features, 4 embedding PCs, probability, positive flag, request
metadata). The reference is a
5,000-row training profile (the cap of ``pipeline.job.REFERENCE_MAX_ROWS``). For each size the
script times, in one process:

- reading the window: ours (``production_log.read(last_k=N, where=version)``: newest files
  first, stop when N rows of that version are found) vs the baseline of reading every file and
  filtering afterwards;
- the Evidently report (``pipeline.monitoring.drift.drift_report``: DataDriftPreset on inputs, prediction
  drift, data-quality tests, HTML + JSON written), on a shifted window.

Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

CHUNK = 1000


def rows(n: int, seed: int, shift: float, start: datetime, version: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    mean = np.clip(rng.normal(0.45 + 0.1 * shift, 0.05, n), 0, 1)
    df = pd.DataFrame({
        "request_id": [f"{seed:04d}{i:012d}" for i in range(n)],
        "request_time": [start + timedelta(milliseconds=50 * i) for i in range(n)],
        "source": "api", "model_name": "bench", "model_version": version, "format": "png",
        "mean": mean, "std": np.clip(rng.normal(0.2, 0.02, n), 0, 1), "p05": np.clip(mean - 0.3, 0, 1),
        "p50": mean, "p95": np.clip(mean + 0.3, 0, 1), "contrast": np.clip(rng.normal(0.6, 0.05, n), 0, 1),
        "entropy": rng.normal(7.0, 0.2, n), "sharpness": rng.normal(5.0 + shift, 1.0, n),
        "width": rng.choice([1024.0, 2048.0], n), "height": rng.choice([1024.0, 2048.0], n), "aspect": 1.0,
        "bit_depth": 8.0, "view_position": rng.choice(["PA", "AP"], n),
    })
    for i in range(4):
        df[f"emb_pc{i + 1}"] = rng.normal(shift if i == 0 else 0.0, 1.0, n)
    df["probability"] = np.clip(rng.beta(2, 5, n) + 0.1 * shift, 0, 1)
    df["label"] = np.where(df["probability"] >= 0.4, "PNEUMONIA", "NORMAL")
    df["predicted_positive"] = (df["probability"] >= 0.4).astype(float)
    return df


def write_log(log_dir: Path, n: int) -> None:
    """``n`` rows served by version 1, then ``n`` by version 2 (the champion moved), in 1,000-row files."""
    from pipeline.serving import production_log

    start = datetime.now(UTC) - timedelta(hours=12)
    for v, shift in (("1", 0.0), ("2", 0.5)):
        for k in range(0, n, CHUNK):
            chunk = rows(min(CHUNK, n - k), seed=k // CHUNK * 2 + int(v), shift=shift,
                         start=start + timedelta(seconds=(int(v) - 1) * n // 20 + k // 20), version=v)
            production_log.append(log_dir, chunk)


def baseline_read(log_dir: Path, last_k: int, version: str) -> pd.DataFrame:
    files = sorted(log_dir.glob("date=*/part-*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    df = df[df["model_version"] == version].sort_values("request_time", kind="stable")
    return df.tail(last_k).reset_index(drop=True)


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def bench(n: int, root: Path, reference: pd.DataFrame) -> dict[str, float]:
    from pipeline.monitoring.drift import drift_report
    from pipeline.serving import production_log

    log_dir = root / f"log-{n}"
    _, t_write = timed(write_log, log_dir, n)
    current, t_ours = timed(production_log.read, log_dir, last_k=n, where={"model_name": "bench",
                                                                            "model_version": "2"})
    base, t_base = timed(baseline_read, log_dir, n, "2")
    assert len(current) == len(base) == n and current["request_id"].tolist() == base["request_id"].tolist()
    summary, t_report = timed(drift_report, reference, current, root / f"report-{n}", share_threshold=0.3,
                              min_rows=30)
    assert summary["status"] == "ok"
    html = Path(summary["report_html"]).stat().st_size / 1e6
    return {"rows": n, "log_rows_total": production_log.count_rows(log_dir), "files": len(list(
        log_dir.rglob("*.parquet"))), "write_s": t_write, "read_ours_s": t_ours, "read_baseline_s": t_base,
        "report_s": t_report, "total_s": t_ours + t_report, "html_mb": html, "drift_share": summary["drift_share"],
        "method": ",".join(summary["method"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000", help="comma-separated production window sizes")
    args = parser.parse_args()
    from pipeline.runtime import quiet_tools

    quiet_tools()
    t0 = time.perf_counter()
    import evidently  # noqa: F401  (import time reported apart)

    t_import = time.perf_counter() - t0
    reference = rows(5000, seed=999, shift=0.0, start=datetime.now(UTC) - timedelta(days=30), version="1")
    reference = reference[[c for c in reference.columns if reference[c].dtype != object and c != "request_time"]]
    results = []
    with tempfile.TemporaryDirectory(prefix="xrayops-bench-drift-") as tmp:
        # warm-up on a small window so the first measured size does not pay one-off costs
        from pipeline.monitoring.drift import drift_report

        drift_report(reference, rows(500, 1, 0.0, datetime.now(UTC), "1"), Path(tmp) / "warm", share_threshold=0.3,
                     min_rows=30)
        for n in (int(x) for x in args.rows.split(",")):
            print(f"measuring {n} rows …", flush=True)
            results.append(bench(n, Path(tmp), reference))
    print(f"\nReference 5,000 rows; {os.cpu_count()} CPU cores; evidently import {t_import:.1f} s (not included)\n")
    print(f"{'rows':>8}{'files':>7}{'read ours':>11}{'read base':>11}{'report':>9}{'total':>9}{'HTML':>8}  method")
    for r in results:
        print(f"{r['rows']:>8}{r['files']:>7}{r['read_ours_s']:>10.2f}s{r['read_baseline_s']:>10.2f}s"
              f"{r['report_s']:>8.2f}s{r['total_s']:>8.2f}s{r['html_mb']:>6.1f}MB  {r['method']}")
    print(json.dumps({"benchmark": "drift", "cpu_count": os.cpu_count(), "evidently_import_s": round(t_import, 2),
                      "reference_rows": 5000, "results": [{k: round(v, 3) if isinstance(v, float) else v
                                                           for k, v in r.items()} for r in results]}))


if __name__ == "__main__":
    main()
