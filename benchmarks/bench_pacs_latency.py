"""Study arrival → SR in the PACS: latency of the listener + champion + STOW-RS path over N studies.

    uv run python benchmarks/bench_pacs_latency.py [--studies 50] [--interval 1.0] [--side 512] [--stable-age 1]
                                                   [--params PATH]

A throw-away Orthanc (``tests/servers/processes.start_orthanc``: Debian's Orthanc + DICOMweb plugin, loopback,
``StableAge`` = ``--stable-age`` s) and a tiny trained champion (``tests/conftest.train_champion``: the real
ingest → … → promote path, ≈ 1–2 min on 2 cores; or an existing project with ``--params``). The listener runs in a
thread exactly as ``xrayops pacs listen`` with ``pacs.dispatch=direct`` (``pacs.poll_s`` = 0.2 s; the flow
dispatch adds a Prefect flow run per study). Every ``--interval`` s one single-image CR study
(``--side`` px, 16-bit) is stored by ``POST /instances``; its *arrival* is the moment that upload returns. Measured per
study: arrival → the listener hands the stable study over (Orthanc's StableAge + its stability check + the poll),
hand-over → SR stored (QIDO/WADO, gate, inference, SR, STOW-RS, FHIR outbox, records), and the total. Prints a
table of p50 / p95 / max; the last line is JSON.

With Orthanc's default ``StableAge`` of 60 s the total is ≈ 60 s + the figures below: a hospital tunes that
setting (it is how long Orthanc waits for more images of a study), not this code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("XRAYOPS_PSEUDONYM_SALT", "bench-salt-not-secret-0123456789abcdef")


def study_file(index: int, side: int) -> tuple[str, bytes]:
    from pydicom.uid import generate_uid

    from tests.data.helpers import dicom_bytes, edited, xray

    study = generate_uid()
    data = dicom_bytes(xray(index % 16, positive=index % 2 == 1, side=side), patient_id=f"BENCH-{index:04d}",
                       modality="CR", view="PA")
    return study, edited(data, StudyInstanceUID=study, StudyDate="20261201", StudyTime="120000", StudyID="1")


def upload(http_url: str, data: bytes) -> None:
    req = urllib.request.Request(f"{http_url}/instances", data=data, method="POST",
                                 headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, float)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "max": round(float(arr.max()), 3), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between study arrivals")
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--stable-age", type=int, default=1, help="Orthanc StableAge (s)")
    ap.add_argument("--params", type=Path, default=None, help="a project whose champion to use (default: train one)")
    args = ap.parse_args()

    from pipeline.config import load_settings, with_overrides
    from pipeline.pacs.dicomweb import PacsClient
    from pipeline.pacs.listen import ListenSummary, OrthancChanges, poll_once
    from pipeline.pacs.process import PacsContext, process_study
    from pipeline.runtime import quiet_tools
    from tests.servers.processes import start_orthanc

    quiet_tools()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    if args.params is None:
        from tests.conftest import train_champion

        t0 = time.perf_counter()
        (tmp / "project").mkdir()
        base = train_champion(tmp / "project")
        print(f"trained a tiny champion in {time.perf_counter() - t0:.0f} s", flush=True)
    else:
        base = load_settings(args.params)
    settings = with_overrides(base, [f"paths.production_log={tmp / 'production-log'}", f"pacs.state_dir={tmp / 'pacs'}",
                                     "pacs.poll_s=0.2", "pacs.start_at=beginning", "pacs.dispatch=direct"])
    (tmp / "logs").mkdir(exist_ok=True)
    orthanc = start_orthanc(tmp / "logs", tmp / "orthanc", stable_age_s=args.stable_age)
    arrived: dict[str, float] = {}
    picked: dict[str, float] = {}
    done: dict[str, float] = {}
    statuses: dict[str, int] = {}
    try:
        ctx = PacsContext(settings, PacsClient(orthanc.dicomweb_url))
        ctx.refresh()
        ctx.store.require()  # fail now, not in the listener thread
        warm, warm_data = study_file(999, args.side)
        upload(orthanc.http_url, warm_data)
        process_study(ctx, warm)  # warm-up (imports, first inference, first STOW); not measured

        def handle(study_uid: str) -> Any:
            picked.setdefault(study_uid, time.time())
            outcome = process_study(ctx, study_uid)
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
            if outcome.status == "sr_stored":
                done[study_uid] = time.time()
            return outcome

        changes = OrthancChanges(orthanc.http_url)
        stop = threading.Event()

        def loop() -> None:
            summary = ListenSummary()
            while not stop.is_set():
                poll_once(settings, changes, handle, summary)
                stop.wait(settings.pacs.poll_s)

        listener = threading.Thread(target=loop, name="listener", daemon=True)
        listener.start()
        files = [study_file(i, args.side) for i in range(args.studies)]
        for study, data in files:
            upload(orthanc.http_url, data)
            arrived[study] = time.time()
            time.sleep(args.interval)
        deadline = time.time() + 60 + 3 * args.stable_age
        while len(done) < len(files) and time.time() < deadline:
            time.sleep(0.2)
        stop.set()
        listener.join(timeout=30)
    finally:
        orthanc.stop()
    missing = [s for s in arrived if s not in done]
    total = [done[s] - arrived[s] for s in arrived if s in done]
    wait = [picked[s] - arrived[s] for s in arrived if s in done]
    work = [done[s] - picked[s] for s in arrived if s in done]
    rows = [("arrival -> stable study handed over", percentiles(wait)), ("hand-over -> SR stored", percentiles(work)),
            ("arrival -> SR stored (total)", percentiles(total))]
    print(f"\n{len(done)}/{len(arrived)} studies got their SR (statuses {statuses}); Orthanc StableAge "
          f"{args.stable_age} s, listener poll {settings.pacs.poll_s} s, {args.side}x{args.side} 16-bit CR, "
          f"one study every {args.interval} s, engine {settings.serve.engine}")
    print(f"{'seconds':<38} {'p50':>7} {'p95':>7} {'max':>7}")
    for name, p in rows:
        print(f"{name:<38} {p['p50']:>7.3f} {p['p95']:>7.3f} {p['max']:>7.3f}")
    print(json.dumps({"bench": "pacs_latency", "studies": len(arrived), "with_sr": len(done), "missing": len(missing),
                      "stable_age_s": args.stable_age, "poll_s": settings.pacs.poll_s, "side": args.side,
                      "interval_s": args.interval, "engine": settings.serve.engine, "statuses": statuses,
                      **{key: p for key, (_, p) in zip(("stable_wait_s", "processing_s", "total_s"), rows,
                                                        strict=True)}}))


if __name__ == "__main__":
    main()
