"""A multi-vendor PACS export through ``xrayops ingest`` in a subprocess, as a hospital team would run it.

The chest radiographs are written in every common transfer syntax by other encoders: DCMTK's
``dcmcjpeg`` (JPEG Lossless SV1 and process 14, 12-bit JPEG Extended, 8-bit baseline),
``dcmcjpls`` (JPEG-LS lossless and near-lossless), ``dcmcrle`` (RLE) and ``dcmconv`` (deflated,
big endian, implicit VR), OpenJPEG through pydicom (JPEG 2000 lossless and lossy), plus padded
native pixel data. Around them: CT, MR and NM images, a lateral, a "for processing" image, a
multi-frame, a colour JPEG Lossless file written by GDCM, burned-in annotation, a truncated
file and a deflate bomb (1.5 MB promising 20000 x 40000 x 16 bit). Every header carries planted
PHI. Expected: every chest radiograph ingested, nothing else; every file accounted for with a
reason; no traceback or raw warning on the console; peak RSS of the ingest process under 1 GiB;
no planted PHI in any output or on the console.

DCMTK comes from the OS packages (``infra/scripts/ensure-dcmtk.sh``, run by ``.ci/run``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TINY, write_params
from tests.data.helpers import (
    colour,
    deflated_dicom,
    dicom_bytes,
    edited,
    find_tokens,
    foreign,
    multi_frame,
    xray,
)

pytestmark = pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="DCMTK not installed "
                                "(infra/scripts/ensure-dcmtk.sh; .ci/run installs it)")

PHI = {"PatientName": "Zyxwuth^Qorvanna", "InstitutionName": "Brambleford Infirmary Qx7",
       "AccessionNumber": "ACCZX98765", "ReferringPhysicianName": "Vintroll^Gadsby",
       "StudyDate": "19770412", "PatientBirthDate": "19510923"}
TOKENS = ["Zyxwuth", "Qorvanna", "Brambleford", "ACCZX98765", "Vintroll", "19770412", "19510923", "MRN-7"]
SIDE = 256


def chest(i: int, *, bits: int = 12, **kw: Any) -> bytes:
    """A DX chest PA of patient ``MRN-7<i>`` with planted PHI, explicit VR little endian."""
    pixels = xray(i, 0, i % 2 == 1)
    if pixels.shape[0] != SIDE:
        from PIL import Image

        pixels = np.asarray(Image.fromarray((pixels * 255).astype(np.uint8)).resize((SIDE, SIDE))) / 255.0
    data = dicom_bytes(pixels, patient_id=f"MRN-7{i:02d}", bits_stored=bits, phi=dict(PHI), **kw)
    return edited(data, BodyPartExamined="CHEST")


def eight_bit(data: bytes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = (ds.pixel_array >> 4).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dcmtk(tool: str, flags: list[str], data: bytes, work: Path) -> bytes:
    src, dst = work / "in.dcm", work / "out.dcm"
    src.write_bytes(data)
    subprocess.run([tool, *flags, str(src), str(dst)], check=True, capture_output=True)
    return dst.read_bytes()


def openjpeg(data: bytes, syntax: str, **kw: Any) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.compress(syntax, encoding_plugin="pylibjpeg", **kw)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def padded(data: bytes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = ds.PixelData + b"\x00" * 64  # more bytes than Rows x Columns need
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def export(root: Path, work: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write the export; returns (file → transfer syntax UID of the chest radiographs, file → expected reason)."""
    work.mkdir()
    chests = {
        "sv1.dcm": dcmtk("dcmcjpeg", ["+e1"], chest(0), work),
        "lossless_p14.dcm": dcmtk("dcmcjpeg", ["+el"], chest(1), work),
        "extended12.dcm": dcmtk("dcmcjpeg", ["+ee"], chest(2), work),
        "baseline8.dcm": dcmtk("dcmcjpeg", ["+eb"], eight_bit(chest(3)), work),
        "jpegls.dcm": dcmtk("dcmcjpls", ["+el"], chest(4), work),
        "jpegls_near.dcm": dcmtk("dcmcjpls", ["+en"], chest(5), work),
        "rle.dcm": dcmtk("dcmcrle", [], chest(6), work),
        "deflated.dcm": dcmtk("dcmconv", ["+td"], chest(7), work),
        "big_endian.dcm": dcmtk("dcmconv", ["+tb"], chest(8), work),
        "implicit.dcm": dcmtk("dcmconv", ["+ti"], chest(9), work),
        "j2k_lossless.dcm": openjpeg(chest(10), "1.2.840.10008.1.2.4.90"),
        "j2k_lossy.dcm": openjpeg(chest(11), "1.2.840.10008.1.2.4.91", j2k_cr=[20]),
        "padded.dcm": padded(chest(12)),
        "cr_mono1_ap.dcm": edited(chest(13, modality="CR", view="AP", photometric="MONOCHROME1"),
                                  BodyPartExamined=None),
    }
    others = {
        "ct.dcm": (foreign("CT_small.dcm", **PHI), "modality"),
        "mr.dcm": (foreign("MR_small_jpeg_ls_lossless.dcm", **PHI), "modality"),
        "nm.dcm": (foreign("JPGExtended.dcm", **PHI), "modality"),
        "rgb_sv1_gdcm.dcm": (foreign("SC_rgb_jpeg_gdcm.dcm", Modality="DX", **PHI), "colour"),
        "lateral.dcm": (dcmtk("dcmcjpeg", ["+e1"], chest(20, view="LL"), work), "view"),
        "for_processing.dcm": (edited(chest(21), PresentationIntentType="FOR PROCESSING"), "presentation_intent"),
        "cine.dcm": (multi_frame(chest(22), 4), "frames"),
        "dx_rgb.dcm": (colour(chest(23)), "colour"),
        "burned_in.dcm": (edited(chest(24), BurnedInAnnotation="YES"), "burned_in"),
        "cut.dcm": (chest(25)[:-5000], "truncated"),
        "bomb.dcm": (deflated_dicom(20000, 40000), "too_large_image"),
        "notes.dcm": (b"DICM? no: " + b"Zyxwuth^Qorvanna" * 10, "not_an_image"),
    }
    root.mkdir()
    lines = ["file,label"]
    for i, (name, data) in enumerate([*chests.items(), *((n, d) for n, (d, _) in others.items())]):
        (root / name).write_bytes(data)
        lines.append(f"{name},{'PNEUMONIA' if i % 2 else 'NORMAL'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    syntaxes = {name: _syntax(data) for name, data in chests.items()}
    return syntaxes, {name: reason for name, (_, reason) in others.items()}


def _syntax(data: bytes) -> str:
    import pydicom

    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_a_multi_vendor_pacs_export_ingests_every_chest_radiograph_and_nothing_else(tmp_path: Path) -> None:
    syntaxes, expected = export(tmp_path / "export", tmp_path / "work")
    assert len(set(syntaxes.values())) >= 12, syntaxes  # the encoders wrote the syntaxes asked for
    (tmp_path / "project").mkdir()
    params = write_params(tmp_path / "project", [*TINY, "data.source=dicom", "data.version_with_dvc=false",
                                                 "data.ingest.max_pixels=100000000"])
    xrayops = Path(sys.executable).with_name("xrayops")
    probe = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(rc)")
    env = {**os.environ, "COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, "-c", probe, str(xrayops), "ingest", "--params", str(params),
                          "--input", str(tmp_path / "export"), "--labels", str(tmp_path / "export" / "labels.csv")],
                         capture_output=True, text=True, env=env, cwd=tmp_path / "project", timeout=300)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    peak_mib = int(console.split("PEAK_RSS_KIB")[1].split()[0]) / 1024
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
    assert "Traceback" not in console and "Warning" not in console, console[-3000:]
    dataset = tmp_path / "project" / "data" / "datasets" / "dicom"
    summary = json.loads((dataset / "ingest_summary.json").read_text())
    assert summary["ingested"] == len(syntaxes), (summary["quarantine_reasons"], summary["excluded_by_policy"])
    policy_reasons = {r for r in expected.values() if r not in ("truncated", "too_large_image", "not_an_image")}
    assert set(summary["excluded_by_policy"]) == policy_reasons
    assert summary["quarantine_reasons"] == {"truncated": 1, "too_large_image": 1, "not_an_image": 1}
    assert summary["files_found"] == summary["files_seen"] == len(syntaxes) + len(expected)
    assert (summary["ingested"] + summary["quarantined"] + sum(summary["excluded_by_policy"].values())
            == summary["files_seen"])
    leaks = find_tokens([tmp_path / "project"], TOKENS)  # the dataset, the local state, the logs
    assert not leaks, leaks
    assert not [t for t in TOKENS if t.lower() in console.lower()], console[-2000:]
    print(f"PACS export: {len(syntaxes)} chest radiographs in {len(set(syntaxes.values()))} syntaxes ingested, "
          f"{len(expected)} others accounted for; ingest peak RSS {peak_mib:.0f} MiB")
