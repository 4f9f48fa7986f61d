"""Pull throughput from a real PACS (Orthanc + DICOMweb) next to ingesting the same files from a folder.

    uv run python benchmarks/bench_pacs_pull.py [--images 100] [--side 1024] [--keep DIR]

Inputs: ``--images`` synthetic CR chest PAs, ``--side`` px square, 16-bit (BitsStored 12, Explicit VR
Little Endian; the project's renderer through ``tests/data/helpers.py``; 8 distinct renders reused
with a new SOP/Study/Series UID per file, so every file has its own bytes), two files per patient,
labelled by SOPInstanceUID. A throw-away Orthanc (``tests/servers/processes.start_orthanc``:
/usr/sbin/Orthanc with its DICOMweb plugin, loopback, temp storage) receives them by REST
(``POST /instances``). Then, in this order, each timed once (wall clock, the same process):

- store (REST): the upload itself, for reference;
- pull, bytes only: ``PacsClient.iter_instances`` (QIDO-RS, paged) + ``retrieve_instance_bytes``
  (WADO-RS, one instance per request), nothing written;
- pull into the cache: ``DicomwebSource.prepare`` on an empty pull cache (listing + fetch + atomic
  write with fsync of every instance): what ``xrayops ingest --source dicomweb`` does first;
- re-pull, all cached: ``prepare`` again (the listing only: what a resumed pull costs when nothing is missing);
- ingest of the pull cache: ``run_ingest`` with ``data.source=dicomweb`` (the files just pulled);
- ingest of the folder: ``run_ingest`` with ``data.source=dicom`` on a folder holding the same files;

(after a warm-up ingest of two files, so that neither pays for imports and the first decode)
and the end-to-end PACS figure (pull into the cache + ingest) next to the folder ingest. Both ingests
use ``params.yaml``'s ``data.ingest`` (workers 0 = one per core, executor auto) and must produce the
same manifest (checked: image ids, patients, labels). MB are 10^6 bytes of DICOM files. Prints a table;
the last line is JSON. ~1–2 min for the defaults on 2 shared cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("XRAYOPS_PSEUDONYM_SALT", "bench-salt-not-secret-0123456789abcdef")
DISTINCT = 8


def make_files(n: int, side: int) -> list[bytes]:
    import pydicom
    from pydicom.uid import generate_uid

    from tests.data.helpers import dicom_bytes, xray

    renders = [dicom_bytes(xray(i, positive=i % 2 == 1, side=side), patient_id="P0", modality="CR")
               for i in range(min(n, DISTINCT))]
    files = []
    for k in range(n):
        ds = pydicom.dcmread(io.BytesIO(renders[k % len(renders)]))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID = f"BENCH-{k // 2:04d}"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append(buf.getvalue())
    return files


def settings_for(root: Path, overrides: list[str]) -> Any:
    from pipeline.config import apply_overrides, load_settings

    params = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()),
                             ["data.version_with_dvc=false", *overrides])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_settings(path)


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder, removed)")
    args = ap.parse_args()

    import pandas as pd
    import pydicom

    from pipeline.data.ingest import run_ingest
    from pipeline.data.sources.dicomweb import DicomwebSource
    from pipeline.pacs import PacsClient
    from pipeline.runtime import quiet_tools
    from tests.servers.processes import orthanc_missing, start_orthanc

    quiet_tools()
    reason = orthanc_missing()
    if reason:
        sys.exit(f"cannot run: {reason}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="xrayops-bench-pacs-"))
    work.mkdir(parents=True, exist_ok=True)
    t_gen, files = timed(lambda: make_files(args.images, args.side))
    total_mb = sum(map(len, files)) / 1e6
    folder = work / "export"
    folder.mkdir(exist_ok=True)
    sops = []
    for k, data in enumerate(files):
        (folder / f"img{k:04d}.dcm").write_bytes(data)
        sops.append(str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID))
    labels = work / "labels.csv"
    labels.write_text("SOPInstanceUID,label\n" + "".join(f"{s},{'PNEUMONIA' if i % 4 < 2 else 'NORMAL'}\n"
                                                         for i, s in enumerate(sops)))
    warm = work / "warm"
    warm.mkdir(exist_ok=True)
    for k in range(2):
        (warm / f"w{k}.dcm").write_bytes(files[k])
    run_ingest(settings_for(work, ["data.source=dicom", f"data.input={warm}", f"data.labels={labels}",  # warm-up
                                   f"data.dataset_dir={work / 'ds-warm'}"]), show_progress=False)
    server = start_orthanc(work, work / "orthanc")
    rows: list[tuple[str, float]] = []
    try:
        def store() -> None:
            for data in files:
                req = urllib.request.Request(f"{server.http_url}/instances", data=data, method="POST",
                                             headers={"Content-Type": "application/dicom"})
                urllib.request.urlopen(req, timeout=60).close()

        rows.append(("store by REST (POST /instances)", timed(store)[0]))

        def pull_bytes() -> int:
            n = 0
            with PacsClient(server.dicomweb_url) as client:
                for ref in client.iter_instances():
                    n += len(client.retrieve_instance_bytes(ref.study_uid, ref.series_uid, ref.sop_uid))
            return n

        t, pulled = timed(pull_bytes)
        assert pulled == sum(map(len, files)), "the PACS returned other bytes than it was given"
        rows.append(("pull, bytes only (QIDO + WADO-RS)", t))

        pacs = settings_for(work, ["data.source=dicomweb", f"data.dicomweb.url={server.dicomweb_url}",
                                   f"data.input={work / 'pull'}", f"data.labels={labels}",
                                   f"data.dataset_dir={work / 'ds-pacs'}"])
        source = DicomwebSource(pacs.data.dicomweb, show_progress=False)
        t_pull, counts = timed(lambda: source.prepare(pacs.raw_dir))
        assert counts["fetched"] == args.images, counts
        rows.append(("pull into the cache (prepare, cold)", t_pull))
        t, counts = timed(lambda: source.prepare(pacs.raw_dir))
        assert counts["fetched"] == 0 and counts["cached"] == args.images, counts
        rows.append(("re-pull, all cached (listing only)", t))
        t_ing_pacs, s_pacs = timed(lambda: run_ingest(pacs, show_progress=False))
        rows.append(("ingest of the pull cache", t_ing_pacs))
        rows.append(("PACS end to end (pull + ingest)", t_pull + t_ing_pacs))
        local = settings_for(work, ["data.source=dicom", f"data.input={folder}", f"data.labels={labels}",
                                    f"data.dataset_dir={work / 'ds-folder'}"])
        t_ing_folder, s_folder = timed(lambda: run_ingest(local, show_progress=False))
        rows.append(("ingest of the folder (dicom source)", t_ing_folder))
        assert s_pacs["ingested"] == s_folder["ingested"] == args.images, (s_pacs, s_folder)
        cols = ["image_id", "patient_id", "label"]
        m_pacs = pd.read_parquet(work / "ds-pacs" / "manifest.parquet")[cols].sort_values("image_id")
        m_folder = pd.read_parquet(work / "ds-folder" / "manifest.parquet")[cols].sort_values("image_id")
        assert m_pacs.reset_index(drop=True).equals(m_folder.reset_index(drop=True)), "manifests differ"
    finally:
        server.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"\n{args.images} CR instances, {args.side}x{args.side} 16-bit, {total_mb:.1f} MB "
          f"({total_mb / args.images:.2f} MB each); Orthanc on loopback; {os.cpu_count()} CPUs, load {load:.1f}; "
          f"files generated in {t_gen:.1f} s\n")
    print(f"{'step':<40} {'s':>7} {'inst/s':>8} {'MB/s':>8}")
    result = {}
    for name, seconds in rows:
        print(f"{name:<40} {seconds:7.2f} {args.images / seconds:8.1f} {total_mb / seconds:8.1f}")
        result[name] = {"s": round(seconds, 3), "instances_per_s": round(args.images / seconds, 1),
                        "mb_per_s": round(total_mb / seconds, 1)}
    print(json.dumps({"images": args.images, "side": args.side, "mb": round(total_mb, 1), "load": round(load, 1),
                      "steps": result}))


if __name__ == "__main__":
    main()
