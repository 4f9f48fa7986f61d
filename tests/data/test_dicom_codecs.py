"""DICOM transfer syntaxes: files written by other encoders decode like pydicom's reference, broken ones get
their reason, and nothing is expanded before the header allows it.

The sample files ship inside the pydicom wheel (``pydicom.data.get_testdata_file`` resolves them
without network). They are MR/CT/NM/SC images: decoding is tested at the ``decode_bytes`` level, the
admission policy of a chest dataset is not.
"""

from __future__ import annotations

import io
import logging
import resource
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.data import dicom
from pipeline.data.dicom import read_header, stored_pixels
from pipeline.data.imaging import decode_bytes
from pipeline.data.ingest import run_ingest
from pipeline.errors import BadImage, Rejected
from pipeline.serving.admission import admit
from tests.data.helpers import chest_policy, deflated_dicom, write_dicom

MAX = 100_000_000
ANY_MODALITY = "[CR, DX, CT, MR, OT, US, NM, XA, RF, MG, RTDOSE]"
MR_SMALL = "MR_small.dcm"  # Explicit VR Little Endian: the uncompressed sibling of the MR_small_* files

# file, its transfer syntax, the uncompressed file holding the same pixels (lossless) or None (lossy / no sibling)
DECODABLE = [
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", None),  # 12-bit JPEG Extended
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", MR_SMALL),
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", None),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", MR_SMALL),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", None),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", MR_SMALL),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", None),  # Deflated Explicit VR Little Endian
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", MR_SMALL),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2", MR_SMALL),
    ("MR_small_padded.dcm", "1.2.840.10008.1.2.1", MR_SMALL),  # pixel data longer than needed
]


def sample(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with pydicom"
    with open(path, "rb") as fh:
        return fh.read()


def reference(name: str) -> tuple[Any, np.ndarray]:
    """pydicom's own read and decode of a bundled file (warnings of odd sample files ignored)."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(sample(name)))
        return ds, ds.pixel_array


def reason_of(data: bytes, **kwargs: Any) -> BadImage:
    with pytest.raises(BadImage) as info:
        decode_bytes(data, max_pixels=kwargs.pop("max_pixels", MAX), **kwargs)
    return info.value


@pytest.mark.parametrize(("name", "syntax", "sibling"), DECODABLE)
def test_every_common_syntax_decodes_like_the_reference(name: str, syntax: str, sibling: str | None) -> None:
    ref_ds, ref = reference(name)
    assert ref_ds.file_meta.TransferSyntaxUID == syntax
    stored = stored_pixels(read_header(sample(name), max_pixels=MAX))
    assert stored.shape == ref.shape and np.array_equal(stored.astype(np.int64), ref.astype(np.int64))
    if sibling:  # lossless: the very pixels of the uncompressed file
        assert np.array_equal(stored.astype(np.int64), reference(sibling)[1].astype(np.int64))
    image = decode_bytes(sample(name), max_pixels=MAX, dicom_bit_depth=16)
    expected = dicom._display_values(ref, ref_ds, 16, str(ref_ds.PhotometricInterpretation))
    assert image.format == "dicom" and np.array_equal(image.pixels, expected)


def test_jpeg_lossless_sv1_decodes_like_the_rle_file_of_the_same_image() -> None:
    """The only bundled JPEG Lossless SV1 file (GDCM) is RGB: same pixels as its RLE twin; refused as colour."""
    data = sample("SC_rgb_jpeg_gdcm.dcm")
    ds, ref = reference("SC_rgb_jpeg_gdcm.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    stored = stored_pixels(read_header(data, max_pixels=MAX))
    assert np.array_equal(stored, ref) and np.array_equal(stored, reference("SC_rgb_rle.dcm")[1])
    assert reason_of(data).reason == "unsupported_mode"


@pytest.mark.parametrize(("name", "reason"), [
    ("MR_truncated.dcm", "truncated"),  # native pixel data 62 bytes short
    ("JPEG-lossy.dcm", "corrupt_pixel_data"),  # NEMA's non-conformant 12-bit JPEG (JPGExtended.dcm is its fix)
    ("JPEG2000-embedded-sequence-delimiter.dcm", "corrupt_pixel_data"),  # SIZ bytes overwritten
])
def test_broken_sample_files_get_their_reason(name: str, reason: str) -> None:
    assert reason_of(sample(name)).reason == reason


def _with_pixel_data(name: str, **header: Any) -> bytes:
    """A bundled file rewritten with header changes."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(sample(name)))
    for key, value in header.items():
        if key == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_encapsulated_pixel_data_that_ends_early_is_truncated() -> None:
    whole = sample("MR_small_jp2klossless.dcm")  # pixel data, then trailing padding (FFFC,FFFC)
    end = whole.rindex(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # the sequence delimiter
    no_delimiter = reason_of(whole[:end])  # every fragment complete, the end of the sequence missing
    assert no_delimiter.reason == "truncated" and "delimiter" in no_delimiter.detail
    assert reason_of(whole[:end - 200]).reason == "truncated"  # cut inside the last fragment
    assert reason_of(whole[:end] + b"\xfe\xff\x00\xe0" + bytes(4)).reason == "truncated"  # cut after an item tag
    assert reason_of(sample(MR_SMALL)[:-3000]).reason == "truncated"  # native


def test_a_syntax_without_decoder_names_the_uid_and_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    mpeg2 = reason_of(_with_pixel_data("MR_small_jp2klossless.dcm", TransferSyntaxUID="1.2.840.10008.1.2.4.100"))
    assert mpeg2.reason == "no_decoder" and "1.2.840.10008.1.2.4.100 (MPEG2 Main Profile" in mpeg2.detail
    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))  # as without pylibjpeg installed
    jls = reason_of(sample("MR_small_jpeg_ls_lossless.dcm"))
    assert jls.reason == "no_decoder"
    assert "1.2.840.10008.1.2.4.80" in jls.detail and "JPEG-LS Lossless" in jls.detail
    assert "pylibjpeg-libjpeg" in jls.detail


def test_an_rle_segment_that_overruns_its_frame_is_refused_without_a_panic(
        capfd: pytest.CaptureFixture[str]) -> None:
    """pylibjpeg-rle panics (Rust prints it on stderr) on a segment that inflates past Rows x Columns."""
    import pydicom
    from pydicom.encaps import encapsulate

    def repeat_runs(n: int) -> bytes:  # PackBits: byte 257-k, then the byte to repeat k times
        runs = b"".join(bytes([257 - min(128, n - i), 7]) for i in range(0, n, 128))
        return runs + b"\x80" * (len(runs) % 2)

    long, ok = repeat_runs(64 * 64 + 200), repeat_runs(64 * 64)
    header = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (64 + len(long)).to_bytes(4, "little")
    ds = pydicom.dcmread(io.BytesIO(sample("MR_small_RLE.dcm")))
    ds.PixelData = encapsulate([header + bytes(52) + long + ok])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    refused = reason_of(buf.getvalue())
    assert refused.reason == "corrupt_pixel_data" and "4296 bytes" in refused.detail
    assert "panicked" not in capfd.readouterr().err


def test_a_codestream_larger_than_the_header_is_refused_before_decoding() -> None:
    lied = reason_of(_with_pixel_data("MR_small_jp2klossless.dcm", Rows=32, Columns=32))
    assert lied.reason == "corrupt_pixel_data" and "64x64" in lied.detail


def test_a_dicom_signature_over_garbage_is_not_dicom() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        garbage = bytes(128) + b"DICM" + rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes()
        assert reason_of(garbage).reason in ("not_dicom", "truncated")


def test_multi_frame_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """15 RLE frames are never expanded to learn that the file has more than one."""
    def no_decoding(dcm: object) -> None:
        raise AssertionError("pixel data decoded for a file the header already refuses")

    monkeypatch.setattr(dicom, "stored_pixels", no_decoding)
    refused = reason_of(sample("rtdose_rle.dcm"))
    assert refused.reason == "unsupported_mode" and "15 frames" in refused.detail


@pytest.mark.parametrize("exclude", [True, False])
def test_burned_in_annotation_is_excluded_unless_allowed(tmp_path: Path, exclude: bool) -> None:
    from pipeline.data.manifest import IngestOptions, ingest_records
    from pipeline.data.sources.base import XRAY_PROFILE, RawRecord

    records = []
    for i, burned in enumerate(("YES", "NO", None)):
        path = tmp_path / "raw" / f"img{i}.dcm"
        write_dicom(path, i, patient_id=f"P{i}", phi={"BurnedInAnnotation": burned} if burned else None)
        records.append(RawRecord(path, path.name, "NORMAL", None))
    opts = IngestOptions(source="test", classes=("NORMAL", "PNEUMONIA"), profile=XRAY_PROFILE,
                         salt=b"burned-in-test-salt-" * 2, min_size=32, max_pixels=MAX, max_bytes=1 << 20,
                         dicom_bit_depth=8, workers=1, policy=chest_policy(exclude_burned_in=exclude))
    summary = ingest_records(records, tmp_path / "ds", opts)
    assert summary["ingested"] == (2 if exclude else 3) and summary["quarantined"] == 0
    assert summary["excluded_by_policy"] == ({"burned_in": 1} if exclude else {})


# --------------------------------------------------------------------------- bounded memory


def measured(fn: Callable[[], object]) -> tuple[BaseException | None, float, float]:
    """(exception raised, peak MiB traced by tracemalloc, MiB the process' peak RSS grew) while ``fn`` runs."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    raised: BaseException | None = None
    try:
        fn()
    except (BadImage, Rejected) as exc:
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return raised, peak, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024


def test_the_deflated_reader_decodes_a_small_honest_file() -> None:
    image = decode_bytes(deflated_dicom(300, 200), max_pixels=MAX)
    assert (image.width, image.height, image.identifiers["patient_id"]) == (200, 300, "BOMB-1")
    assert reason_of(deflated_dicom(300, 200)[:-60]).reason == "truncated"  # deflate stream cut short


def test_a_deflated_gigapixel_promise_is_refused_with_bounded_memory(make_settings: Callable[..., Settings]) -> None:
    """1.5 MB on disk, 20000 x 40000 x 16 bit (1.6 GB) inside: pydicom alone inflated it whole (3.2 GiB peak)."""
    bomb = deflated_dicom(20000, 40000)
    assert len(bomb) < 2_000_000
    raised, peak, rss = measured(lambda: decode_bytes(bomb, max_pixels=MAX))
    assert isinstance(raised, BadImage) and raised.reason == "too_large_image", raised
    assert peak < 32 and rss < 200, (peak, rss)
    serve = make_settings().serve
    raised, peak, rss = measured(lambda: admit(bomb, serve))
    assert isinstance(raised, Rejected) and raised.reason == "too_many_pixels", raised
    assert peak < 32 and rss < 200, (peak, rss)


def test_a_deflated_body_larger_than_its_header_declares_is_refused_with_bounded_memory() -> None:
    """A 256 x 256 header over 512 MiB of trailing data: inflation stops just past what the header allows."""
    raised, peak, rss = measured(lambda: decode_bytes(deflated_dicom(256, 256, trailing_bytes=512 << 20),
                                                      max_pixels=MAX))
    assert isinstance(raised, BadImage) and raised.reason == "decompression_bomb", raised
    assert "inflates beyond" in raised.detail and peak < 32 and rss < 200, (peak, rss)


def test_a_deflated_header_that_never_ends_is_refused_with_bounded_memory() -> None:
    raised, peak, rss = measured(lambda: decode_bytes(deflated_dicom(64, 64, private_bytes=256 << 20),
                                                      max_pixels=MAX))
    assert isinstance(raised, BadImage) and raised.reason == "decompression_bomb", raised
    assert peak < 100 and rss < 200, (peak, rss)


# --------------------------------------------------------------------------- quiet


def test_quarantined_dicom_files_print_nothing(make_settings: Callable[..., Settings], tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """pydicom logs decoder failures at ERROR with tracebacks and warns on odd values: none of it reaches the
    console or the log during a folder ingest; the quarantine (and its summary) says what happened."""
    root = tmp_path / "pacs"
    broken = {"lossy.dcm": "JPEG-lossy.dcm", "badvr.dcm": "badVR.dcm", "cut.dcm": "MR_truncated.dcm"}
    lines = ["file,label"]
    for i in range(3):
        write_dicom(root / f"good{i}.dcm", i, patient_id=f"P{i}")
        lines.append(f"good{i}.dcm,NORMAL")
    for name, bundled in broken.items():
        (root / name).write_bytes(sample(bundled))
        lines.append(f"{name},NORMAL")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    settings = make_settings("data.source=dicom", f"data.input={root}", "data.version_with_dvc=false",
                             "data.ingest.workers=1", f"data.admission.modalities={ANY_MODALITY}",
                             "data.admission.body_parts=[CHEST, WHOLE BODY]")  # pydicom's samples: NM, MR, RTDOSE
    caplog.set_level(logging.DEBUG)
    for name in ("pydicom", "pylibjpeg", "libjpeg", "openjpeg"):
        caplog.set_level(logging.DEBUG, logger=name)  # everything they emit would be captured
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_ingest(settings, show_progress=False)
    assert summary["ingested"] == 3
    assert summary["quarantine_reasons"] == {"corrupt_pixel_data": 2, "truncated": 1}
    out, err = capfd.readouterr()
    assert not [w for w in caught if "pydicom" in w.filename or "jpeg" in w.filename], [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.name.split(".")[0] in ("pydicom", "pylibjpeg", "libjpeg", "openjpeg")]
    assert "Traceback" not in out + err and "Warning" not in out + err, (out + err)[-2000:]
