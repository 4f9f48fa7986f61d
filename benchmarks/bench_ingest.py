"""Ingestion throughput and memory: ours (parallel ``ingest_records``) vs a naive sequential loop.

    uv run python benchmarks/bench_ingest.py [--images 2000] [--small 1000] [--rounds 3]

The images are synthetic 512x512 8-bit chest radiographs (the project's cohort renderer),
PNG at the default compression, generated once into a cache folder outside git
(``$XRAYOPS_BENCH_CACHE`` or ``~/.cache/xrayops/bench-ingest``). Both contenders read the
same files from a warm page cache, alternating, best of ``--rounds``:

- naive: one loop — read the bytes, sha256, decode with Pillow, mean/std of the pixels;
- ours: the real ingestion (``pipeline.data.manifest.ingest_records`` with the default
  worker count, executor and PNG inflate, i.e. worker processes and ISA-L): read, sha256,
  decode with checks, features + pHash, de-identified image store, streaming Parquet
  manifest, quarantine and summary; each call's time includes forking its worker processes
  (and, in the first round, starting the fork server that imports NumPy/Pillow once per process);
- ours with Pillow's own inflate (``png_inflate=pillow``: the decoder the naive loop uses,
  so this row is the parallel speed-up alone), on threads (``executor=thread``) and on
  1 worker (in the calling process), for reference;
- ceilings: the naive per-image work split over as many processes (started before the
  clock starts; the speed-up these cores give at that moment) and over as many threads.

Peak memory (max RSS) of ours is measured in fresh child processes at two dataset sizes,
to show it stays flat in the number of images. Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SIDE = 512
GENERATOR = "v1"


def cache_dir(n: int) -> Path:
    base = Path(os.environ.get("XRAYOPS_BENCH_CACHE") or Path.home() / ".cache" / "xrayops" / "bench-ingest")
    return base / f"png{SIDE}-{n}-{GENERATOR}"


def _render(args: tuple[Path, int]) -> None:
    from pipeline.data.synthetic import CohortSpec, Patient, render_image, to_pixels

    path, i = args
    spec = CohortSpec(n_patients=1, images_per_patient=(1, 1), prevalence=0.5, image_size=SIDE, bit_depth=8,
                      bad_files=0, shift=0.0, seed=2026)
    patient = Patient(f"B{i // 2}", "PNEUMONIA" if i % 5 == 0 else "NORMAL", "F", 50, "PA", 2, i // 2)
    Image.fromarray(to_pixels(render_image(patient, i % 2, spec), 8)).save(path, format="PNG")


def ensure_images(n: int) -> list[Path]:
    """``n`` distinct PNGs in the cache folder (generated once, in parallel)."""
    folder = cache_dir(n)
    done = folder / "done"
    paths = [folder / f"img{i:05d}.png" for i in range(n)]
    if done.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_render, [(p, i) for i, p in enumerate(paths)], chunksize=16))
    done.write_text(f"{n}\n")
    print(f"generated {n} images in {time.perf_counter() - t0:.0f} s under {folder}", file=sys.stderr)
    return paths


def warm(paths: list[Path]) -> int:
    return sum(len(p.read_bytes()) for p in paths)


def naive(paths: list[Path]) -> float:
    """The naive sequential loop; returns seconds."""
    t0 = time.perf_counter()
    rows = []
    for path in paths:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        pixels = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 255.0
        rows.append((sha, float(pixels.mean()), float(pixels.std())))
    assert len(rows) == len(paths)
    return time.perf_counter() - t0


def _naive_one(path: Path) -> tuple[str, float, float]:
    data = path.read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 255.0
    return hashlib.sha256(data).hexdigest(), float(pixels.mean()), float(pixels.std())


def naive_threads(paths: list[Path], workers: int) -> float:
    """The naive per-image work on a thread pool (threads share one interpreter lock)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        assert len(list(pool.map(_naive_one, paths, chunksize=8))) == len(paths)
    return time.perf_counter() - t0


def _naive_part(part: list[Path], barrier: Any, results: Any) -> None:
    naive(part[:10])
    barrier.wait()
    results.put(naive(part))


def naive_processes(paths: list[Path], workers: int) -> float:
    """The naive loop on ``workers`` processes, each on its share of the files: the hardware
    ceiling (the processes are started and warmed up before the clock starts)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=_naive_part, args=(paths[i::workers], barrier, results)) for i in range(workers)]
    for proc in procs:
        proc.start()
    barrier.wait()
    t0 = time.perf_counter()
    for _ in procs:
        results.get()
    seconds = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    return seconds


def ours(paths: list[Path], out: Path, workers: int = 0, executor: str = "auto", png_inflate: str = "isal") -> float:
    """The real ingestion into ``out``; returns seconds."""
    from pipeline.data.manifest import IngestOptions, ingest_records
    from pipeline.data.sources.base import XRAY_PROFILE, RawRecord

    shutil.rmtree(out, ignore_errors=True)
    opts = IngestOptions(source="bench", classes=("NORMAL", "PNEUMONIA"), profile=XRAY_PROFILE,
                         salt=b"bench-salt", min_size=32, max_pixels=100_000_000, max_bytes=268_435_456,
                         dicom_bit_depth=8, workers=workers, executor=executor, png_inflate=png_inflate)
    records = [RawRecord(p, p.name, "NORMAL" if i % 5 else "PNEUMONIA", f"B{i // 2}") for i, p in enumerate(paths)]
    t0 = time.perf_counter()
    summary = ingest_records(records, out, opts)
    seconds = time.perf_counter() - t0
    assert summary["ingested"] == len(paths), summary["quarantine_reasons"]
    return seconds


def rss_mib() -> float:
    """Current resident set size of this process (Linux ``/proc``), in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tree_rss_mib() -> float:
    """RSS of this process plus all its descendants (the fork server and ingestion workers), in MiB.

    A sum of RSS counts pages the processes share (libraries) once per process: an upper bound.
    """
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(entry)], rss[int(entry)] = int(fields[1]), int(fields[21])
    family, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in family} - family
        family |= more
        grew = bool(more)
    return sum(rss.get(pid, 0) for pid in family) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(n: int, out: str) -> None:
    """Child-process entry: run ours on ``n`` cached images, print RSS before / peak (sampled) / max RSS
    of this process, and the peak of this process plus its worker processes."""
    import threading

    import pipeline.data.manifest  # noqa: F401  (imports are not part of the measure)

    paths = ensure_images(N_CACHE)[:n]
    warm(paths)
    before, peak, peak_all, stop = rss_mib(), [0.0], [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib())
            peak_all[0] = max(peak_all[0], tree_rss_mib())
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = ours(paths, Path(out))
    stop.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "rss_before_mib": before, "rss_peak_mib": max(peak[0], rss_mib()),
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tree_rss_peak_mib": peak_all[0]}))


def child_peak_rss(n: int, out: Path) -> dict[str, float]:
    """Run ours on the first ``n`` images in a fresh process; its memory figures."""
    proc = subprocess.run([sys.executable, __file__, "--child-memory", str(n), "--child-out", str(out),
                           "--images", str(N_CACHE)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


N_CACHE = 2000


def main() -> None:
    global N_CACHE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=1000, help="smaller size for the memory comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    N_CACHE = args.images
    if args.child_memory is not None:
        measure_memory(args.child_memory, args.child_out)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.runtime import quiet_tools

    quiet_tools()
    paths = ensure_images(args.images)
    total_bytes = warm(paths)
    workers = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        ours(paths[:50], tmp / "warmup")  # imports, caches (50 files: no worker processes yet)
        naive(paths[:50])
        times: dict[str, list[float]] = {"naive": [], "ours": [], "ours_pillow": [], "ours_threads": [],
                                         "ours_1": [], "ceiling": [], "ceiling_threads": []}
        for _ in range(args.rounds):
            times["naive"].append(naive(paths))
            times["ours"].append(ours(paths, tmp / "ours"))
            times["ours_pillow"].append(ours(paths, tmp / "ours_p", png_inflate="pillow"))
            times["ours_threads"].append(ours(paths, tmp / "ours_t", executor="thread"))
            times["ceiling"].append(naive_processes(paths, workers))
            times["ceiling_threads"].append(naive_threads(paths, workers))
        times["ours_1"].append(ours(paths, tmp / "ours1", workers=1))
        mem = {n: child_peak_rss(n, tmp / f"mem{n}") for n in (args.small, args.images)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(paths)
    rate = {k: n / min(v) for k, v in times.items()}
    report(n, total_bytes, workers, rate, times, mem, args)


def report(n: int, total_bytes: int, workers: int, rate: dict[str, float], times: dict[str, list[float]],
           mem: dict[int, dict[str, float]], args: argparse.Namespace) -> None:
    ratio = rate["ours"] / rate["naive"]
    print(f"\nIngestion of {n} synthetic {SIDE}x{SIDE} PNGs ({total_bytes / n / 1024:.0f} KiB each), "
          f"{workers} CPU core(s), best of {args.rounds} rounds (all rounds in s shown)")
    print(f"{'contender':<52}{'images/s':>10}{'vs naive':>10}   rounds (s)")
    rows = [("naive sequential (read, sha256, decode, mean/std)", "naive"),
            (f"ours: ingest_records, {workers} worker processes (default)", "ours"),
            (f"ours: {workers} worker processes, Pillow's inflate", "ours_pillow"),
            (f"ours: ingest_records, {workers} threads", "ours_threads"),
            ("ours: ingest_records, 1 worker (in process)", "ours_1"),
            (f"ceiling: the naive loop on {workers} processes", "ceiling"),
            (f"ceiling: the naive loop on {workers} threads", "ceiling_threads")]
    for label, key in rows:
        print(f"{label:<52}{rate[key]:>10.0f}{rate[key] / rate['naive']:>9.2f}x   "
              + " ".join(f"{t:.2f}" for t in times[key]))
    print("\nMemory of ours (fresh process per size; RSS sampled every 10 ms during ingestion; "
          "'with workers' adds the fork server and worker processes)")
    print(f"{'images':>8}{'RSS before':>12}{'peak RSS':>10}{'growth':>8}{'max RSS':>9}{'with workers':>14}   (MiB)")
    for size in (args.small, args.images):
        m = mem[size]
        print(f"{size:>8}{m['rss_before_mib']:>12.0f}{m['rss_peak_mib']:>10.0f}"
              f"{m['rss_peak_mib'] - m['rss_before_mib']:>8.0f}{m['maxrss_mib']:>9.0f}{m['tree_rss_peak_mib']:>14.0f}")
    growth = mem[args.images]["rss_peak_mib"] / mem[args.small]["rss_peak_mib"]
    growth_all = mem[args.images]["tree_rss_peak_mib"] / mem[args.small]["tree_rss_peak_mib"]
    print(f"peak RSS ratio {args.images}/{args.small} images: {growth:.3f} (1.0 = flat); "
          f"with workers {growth_all:.3f}")
    print(json.dumps({
        "benchmark": "ingest", "images": n, "side": SIDE, "cpu_cores": workers,
        "naive_img_s": round(rate["naive"], 1), "ours_img_s": round(rate["ours"], 1),
        "ours_pillow_inflate_img_s": round(rate["ours_pillow"], 1),
        "ours_threads_img_s": round(rate["ours_threads"], 1), "ours_1worker_img_s": round(rate["ours_1"], 1),
        "ratio_ours_vs_naive": round(ratio, 3),
        "ceiling_processes_img_s": round(rate["ceiling"], 1),
        "ratio_ceiling_vs_naive": round(rate["ceiling"] / rate["naive"], 3),
        "ceiling_threads_img_s": round(rate["ceiling_threads"], 1),
        "target_ratio": 1.8, "meets_target": ratio >= 1.8,
        "peak_rss_mib": {str(k): round(v["rss_peak_mib"], 1) for k, v in mem.items()},
        "rss_growth_mib": {str(k): round(v["rss_peak_mib"] - v["rss_before_mib"], 1) for k, v in mem.items()},
        "peak_rss_ratio": round(growth, 3),
        "peak_rss_with_workers_mib": {str(k): round(v["tree_rss_peak_mib"], 1) for k, v in mem.items()},
        "peak_rss_with_workers_ratio": round(growth_all, 3),
    }))


if __name__ == "__main__":
    main()
