"""Quarantine, never silent loss: every kind of bad input gets its reason; ingested + quarantined = files seen."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import IngestOptions, ingest_records, read_links
from pipeline.data.quarantine import REASONS, quarantine_ref
from pipeline.data.sources.base import XRAY_PROFILE, RawRecord
from pipeline.data.synthetic import _png_bomb
from tests.data.helpers import dicom_bytes, to_uint8, write_png, xray

SALT = b"quarantine-test-salt"
MAX_BYTES = 60_000


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jls_dicom(syntax: str = "1.2.840.10008.1.2.4.80") -> bytes:
    """DICOM whose pixels claim JPEG-LS (default) or ``syntax`` but hold a broken stream."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    ds = dcmread(io.BytesIO(dicom_bytes(xray(40), patient_id="P40")))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (64, 64), (10, 20, 30, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def bad_inputs(good: bytes) -> dict[str, tuple[bytes, str | None, str | None]]:
    """reason -> (file bytes, label, patient key) of one file that must be quarantined for it."""
    rng = np.random.default_rng(3)
    return {
        "empty_file": (b"", "NORMAL", "B1"),
        "truncated": (good[: len(good) // 3], "NORMAL", "B2"),
        "not_an_image": (b"Radiology report: no acute findings.\n" * 4, "NORMAL", "B3"),
        "decompression_bomb": (_png_bomb(40000, 40000), "NORMAL", "B4"),
        "unsupported_mode": (_cmyk_jpeg(), "NORMAL", "B5"),
        "too_small": (_png(np.full((12, 12), 90, np.uint8)), "NORMAL", "B6"),
        "colour_image": (_png((rng.random((64, 64, 3)) * 255).astype(np.uint8)), "NORMAL", "B7"),
        "dicom_no_pixels": (dicom_bytes(None, patient_id="B8"), "NORMAL", None),
        "no_decoder": (_jls_dicom("1.2.840.10008.1.2.4.100"), "NORMAL", None),  # MPEG-2: pydicom has no decoder
        "corrupt_pixel_data": (_jls_dicom(), "NORMAL", None),
        "missing_label": (_png(to_uint8(xray(20))), None, "B10"),
        "unknown_label": (_png(to_uint8(xray(21))), "CAT", "B11"),
        "missing_patient": (dicom_bytes(xray(22), patient_id=None), "NORMAL", None),
        "duplicate_image": (good, "PNEUMONIA", "B13"),  # same bytes and label as the first good file
        "too_large_file": (_png((rng.random((300, 300)) * 255).astype(np.uint8)), "NORMAL", "B14"),
        "too_large_image": (_png(np.full((40, 17000), 90, np.uint8)), "NORMAL", "B15"),
    }


def opts(workers: int = 2, executor: str = "auto") -> IngestOptions:
    return IngestOptions(source="test", classes=("NORMAL", "PNEUMONIA"), profile=XRAY_PROFILE, salt=SALT,
                         min_size=32, max_pixels=100_000_000, max_bytes=MAX_BYTES, dicom_bit_depth=8, workers=workers,
                         executor=executor)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_every_bad_input_kind_is_quarantined_with_its_reason(tmp_path: Path, executor: str) -> None:
    raw = tmp_path / "raw"
    goods = [write_png(raw / f"good{i}.png", i, positive=i % 2 == 0) for i in range(6)]
    first = goods[0].read_bytes()
    records = [RawRecord(p, p.name, "PNEUMONIA" if i % 2 == 0 else "NORMAL", f"G{i}") for i, p in enumerate(goods)]
    expected: dict[str, str] = {}
    for reason, (data, label, patient) in bad_inputs(first).items():
        path = raw / f"bad_{reason}.bin"
        path.write_bytes(data)
        records.append(RawRecord(path, path.name, label, patient))
        expected[quarantine_ref(path.name, SALT)] = reason
    # conflicting labels: same bytes as good1 under another label -> both copies leave the manifest
    conflict = raw / "conflict.png"
    conflict.write_bytes(goods[1].read_bytes())
    records.append(RawRecord(conflict, conflict.name, "PNEUMONIA", "G1-other"))

    summary = ingest_records(records, tmp_path / "ds", opts(executor=executor))

    rows = list(csv.DictReader(open(tmp_path / "ds" / "quarantine.csv")))
    got = {r["path"]: r["reason"] for r in rows}
    for ref, reason in expected.items():
        assert got.get(ref) == reason, (reason, got.get(ref))
    conflicted = {r["path"] for r in rows if r["reason"] == "conflicting_labels"}
    assert conflicted == {quarantine_ref("conflict.png", SALT), quarantine_ref("good1.png", SALT)}
    assert summary["ingested"] == 5 and summary["quarantined"] == len(expected) + 2
    assert summary["ingested"] + summary["quarantined"] == summary["files_seen"] == len(records)
    assert all(r["reason"] in REASONS and r["detail"] for r in rows)
    kinds = set(expected.values()) | {"conflicting_labels"}
    assert len(kinds) == 17  # the bad-input kinds this test covers
    on_disk = json.loads((tmp_path / "ds" / "ingest_summary.json").read_text())
    assert on_disk["quarantine_reasons"] == {k: (2 if k == "conflicting_labels" else 1) for k in kinds}
    # identical bytes under two patients link them for the split (duplicate and conflict alike)
    assert len(read_links(tmp_path / "ds")) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_accounting_holds_for_any_worker_count(tmp_path: Path, workers: int) -> None:
    raw = tmp_path / "raw"
    records = []
    for i in range(5):
        p = write_png(raw / f"g{i}.png", i)
        records.append(RawRecord(p, p.name, "NORMAL", f"P{i}"))
    (raw / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    records.append(RawRecord(raw / "bad.png", "bad.png", "NORMAL", "P9"))
    summary = ingest_records(records, tmp_path / "ds", opts(workers))
    assert (summary["files_seen"], summary["ingested"], summary["quarantined"]) == (6, 5, 1)
    assert summary["dataset_hash"].startswith("sha256:") and summary["dvc_md5"] is None


def test_metadata_in_png_and_jpeg_never_reaches_the_image_store(tmp_path: Path) -> None:
    """Text chunks (before or after the pixels), EXIF and JPEG comments can carry PHI: such files are re-encoded."""
    from PIL import PngImagePlugin

    from tests.data.helpers import PHI

    name = PHI["PatientName"]
    px = to_uint8(xray(60))
    raw = tmp_path / "raw"
    raw.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", name)
    Image.fromarray(px).save(raw / "text_before.png", pnginfo=info)
    plain = io.BytesIO()
    Image.fromarray(to_uint8(xray(61))).save(plain, format="PNG")
    data = plain.getvalue()
    iend = data.rindex(b"IEND") - 4
    chunk = b"tEXt" + b"Author\x00" + name.encode()
    trailer = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    (raw / "text_after.png").write_bytes(data[:iend] + trailer + data[iend:])
    Image.fromarray(to_uint8(xray(62))).save(raw / "comment.jpg", format="JPEG", comment=name.encode())
    exif = Image.Exif()
    exif[0x013B] = name  # Artist
    Image.fromarray(to_uint8(xray(63))).save(raw / "exif.jpg", format="JPEG", exif=exif)
    write_png(raw / "clean.png", 64)
    records = [RawRecord(p, p.name, "NORMAL", f"M{i}") for i, p in enumerate(sorted(raw.iterdir()))]
    summary = ingest_records(records, tmp_path / "ds", opts())
    assert summary["ingested"] == 5
    stored = [p for p in (tmp_path / "ds" / "images").rglob("*") if p.is_file()]
    assert len(stored) == 5 and not [p for p in stored if name.encode() in p.read_bytes()]
    assert sum(p.suffix == ".png" for p in stored) == 5  # four re-encoded + the clean PNG linked


def test_unexpected_decoder_failure_quarantines_the_file_not_the_run(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.data.reader as reader

    real = reader.decode_bytes
    poison = b"\x89PNG\r\n\x1a\n" + b"hostile" * 20

    def flaky_decoder(data: bytes, **kwargs: object) -> object:  # a third-party decoder bug on odd input
        if data == poison:
            raise IndexError("list index out of range")
        return real(data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reader, "decode_bytes", flaky_decoder)
    raw = tmp_path / "raw"
    records = [RawRecord(write_png(raw / f"g{i}.png", i), f"g{i}.png", "NORMAL", f"P{i}") for i in range(3)]
    (raw / "odd.png").write_bytes(poison)
    records.append(RawRecord(raw / "odd.png", "odd.png", "NORMAL", "P9"))
    summary = ingest_records(records, tmp_path / "ds", opts())
    assert summary["ingested"] == 3 and summary["quarantine_reasons"] == {"decode_error": 1}
