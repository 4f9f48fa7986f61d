"""The image store keeps only whitelisted PNG chunks and plain JPEGs: PHI in private chunks,
timestamps, text, trailers or junk between segments never reaches a dataset folder."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from pipeline.data.image_store import IMAGES_DIR, PNG_KEEP, jpeg_is_plain, png_chunks
from pipeline.data.imaging import decode_bytes
from pipeline.data.manifest import IngestOptions, ingest_records
from pipeline.data.sources.base import XRAY_PROFILE, RawRecord
from tests.data.helpers import PHI, dicom_bytes, to_uint8, xray

NAME = PHI["PatientName"].encode()


def _opts() -> IngestOptions:
    return IngestOptions(source="test", classes=("NORMAL", "PNEUMONIA"), profile=XRAY_PROFILE, salt=b"store-salt",
                         min_size=32, max_pixels=100_000_000, max_bytes=1 << 20, dicom_bit_depth=8, workers=1)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(index: int, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(xray(index))).save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def _jpeg(index: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(xray(index))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _after_ihdr(data: bytes, chunk: bytes) -> bytes:
    return data[:33] + chunk + data[33:]  # signature (8) + IHDR (25)


def _before_iend(data: bytes, tail: bytes) -> bytes:
    return data[:len(data) - 12] + tail + data[len(data) - 12:]


def _files() -> dict[str, bytes]:
    """File name -> bytes: PHI (or a timestamp) wherever a PNG or JPEG can hide it, one clean file each."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", PHI["PatientName"])
    no_iend = _png(5)[:-12]
    jpeg = _jpeg(8)
    return {
        "private.png": _after_ihdr(_png(1), _chunk(b"prVt", NAME)),
        "time.png": _before_iend(_png(2), _chunk(b"tIME", struct.pack(">HBBBBB", 2024, 2, 29, 13, 37, 1))),
        "trailer.png": _png(3) + b"Patient: " + NAME,
        "text.png": _png(4, info),
        # the decoder stops at the broken chunk and reads the pixels; the chunk walk fails: re-encoded
        "broken_chunk.png": no_iend + struct.pack(">I", len(NAME)) + b"\x00\x01\x02\x03" + NAME,
        "clean.png": _png(6),
        "clean.jpg": _jpeg(7),
        "junk.jpg": jpeg[:20] + NAME + jpeg[20:],  # between APP0 and DQT: the decoder skips it
        "trailer.jpg": _jpeg(9) + NAME,
        "header.dcm": dicom_bytes(xray(10), patient_id="S10", phi=PHI),
    }


def _stored(ds: Path, data: bytes) -> Path:
    image_id = hashlib.sha256(data).hexdigest()[:16]
    found = list((ds / IMAGES_DIR / image_id[:2]).glob(f"{image_id}.*"))
    assert len(found) == 1, image_id
    return found[0]


def test_only_whitelisted_chunks_reach_the_store_with_identical_pixels(tmp_path: Path) -> None:
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    raw.mkdir()
    files = _files()
    records = []
    for i, (name, data) in enumerate(files.items()):
        (raw / name).write_bytes(data)
        records.append(RawRecord(raw / name, name, "NORMAL", f"S{i}"))
    summary = ingest_records(records, ds, _opts())
    assert summary["ingested"] == len(files), summary["quarantine_reasons"]

    for name, data in files.items():
        stored = _stored(ds, data)
        linked = stored.stat().st_ino == (raw / name).stat().st_ino
        assert linked == name.startswith("clean"), name
        body = stored.read_bytes()
        if stored.suffix == ".jpg":
            assert name == "clean.jpg" and jpeg_is_plain(body)
        else:
            chunks = png_chunks(body)
            assert chunks is not None, name
            assert {kind for kind, _, _ in chunks} <= PNG_KEEP, name
            assert chunks[-1][0] == b"IEND" and chunks[-1][2] == len(body), name
        source = decode_bytes(data, max_pixels=1 << 20).pixels  # DICOM: the decoder's pixels
        assert np.array_equal(np.asarray(Image.open(stored)), source), name
    assert {p.name for p in raw.iterdir() if NAME in p.read_bytes()} >= {"private.png", "trailer.png", "junk.jpg"}
    leaks = [p for p in ds.rglob("*") if p.is_file() and NAME in p.read_bytes()]
    assert not leaks


def test_hostile_png_chunk_lengths_do_not_break_the_walk() -> None:
    data = _png(11)
    assert png_chunks(data) is not None
    huge = data[:33] + struct.pack(">I", 0xFFFFFFF0) + b"prVt" + NAME  # a length far past the end
    assert png_chunks(huge) is None
    assert png_chunks(data[:40]) is None  # truncated in a chunk
    assert png_chunks(data[:-12]) is None  # no IEND
    assert png_chunks(data[:8] + data[33:]) is None  # IHDR not first
    assert png_chunks(b"") is None and png_chunks(data[:8] + b"\x00" * 3) is None


def test_a_dataset_an_older_version_linked_to_an_unclean_png_is_cleaned_on_reingest(tmp_path: Path) -> None:
    """Older versions hard-linked PNGs whose only extra chunks were private: re-ingesting replaces that link."""
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    raw.mkdir()
    data = _files()["private.png"]
    (raw / "private.png").write_bytes(data)
    image_id = hashlib.sha256(data).hexdigest()[:16]
    old = ds / IMAGES_DIR / image_id[:2] / f"{image_id}.png"
    old.parent.mkdir(parents=True)
    old.hardlink_to(raw / "private.png")  # what the old store left behind
    assert ingest_records([RawRecord(raw / "private.png", "private.png", "NORMAL", "S1")], ds, _opts())["ingested"]
    stored = _stored(ds, data)
    assert stored.stat().st_ino != (raw / "private.png").stat().st_ino and NAME not in stored.read_bytes()
    assert NAME in (raw / "private.png").read_bytes()  # the original is untouched
