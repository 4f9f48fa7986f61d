"""DICOM files to pixels: every common encoding, bounded memory, reasons that say what happened.

Reading is done in two steps so that nothing large is expanded before it is judged:

1. The header alone (``stop_before_pixels``). For the Deflated Explicit VR syntax the data set
   is inflated only as far as the header needs, in steps, never beyond :data:`MAX_HEADER_BYTES`
   (pydicom itself would inflate the whole body first: a small file promising gigapixels took
   the process to 3 GiB). Rows × Columns × frames × samples × bytes is then checked against the
   caller's ``max_pixels`` (``too_large_image``) and the caller's policy (e.g. one frame)
   before any pixel byte is inflated or decoded.
2. The pixel data element, located by us in the (inflated) bytes: a native value that ends
   early, or an encapsulated one without its sequence delimiter, is ``truncated``; a deflated
   body that inflates beyond what the header declares is ``decompression_bomb``; the first
   JPEG / JPEG-LS / JPEG 2000 codestream must have the header's size (a 64 × 64 header over a
   40000 × 40000 codestream would otherwise be decoded at the codestream's size). Then the
   decoder: none for the syntax is ``no_decoder`` (naming the UID and the package to install),
   a failure on the stream is ``corrupt_pixel_data``.

pydicom's log records and warnings (tracebacks of expected outcomes) are silenced while a
file is read (:func:`quiet_pydicom`): a quarantined file is one quarantine line.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.dicom_stream import (
    Inflater,
    check_rle_frame,
    codestream_size,
    element_header,
    encapsulated_end,
    tag_at,
)
from pipeline.data.policy import AdmissionPolicy, header_int
from pipeline.errors import BadImage

MAX_HEADER_BYTES = 16 << 20  # an inflated header (everything before the pixel data) larger than this is refused
TRAILER_SLACK = 64 << 10  # elements a deflated data set may hold after its pixel data (padding, signatures)
BYTES_PER_PIXEL_BUDGET = 2  # decoded bytes allowed per allowed pixel: a 16-bit grayscale image of max_pixels

DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality",
                "Rows", "Columns")
_LIBJPEG = "pylibjpeg + pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg + pylibjpeg-openjpeg"
_PLUGINS = {  # transfer syntax -> packages whose plugin decodes it (project dependencies: `uv sync`)
    "1.2.840.10008.1.2.4.50": _LIBJPEG, "1.2.840.10008.1.2.4.51": _LIBJPEG, "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG, "1.2.840.10008.1.2.4.80": _LIBJPEG, "1.2.840.10008.1.2.4.81": _LIBJPEG,
    "1.2.840.10008.1.2.4.90": _OPENJPEG, "1.2.840.10008.1.2.4.91": _OPENJPEG, "1.2.840.10008.1.2.4.201": _OPENJPEG,
    "1.2.840.10008.1.2.4.202": _OPENJPEG, "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "pylibjpeg + pylibjpeg-rle",
}

# --------------------------------------------------------------------------- quiet


_QUIET_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle")
_QUIET_MODULES = r"(pydicom|pylibjpeg|openjpeg|libjpeg|rle|pipeline\.data\.dicom)(\.|$)"
_quiet_lock = threading.Lock()
_quiet_state: dict[str, Any] = {"depth": 0}


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's and its plugins' log records and warnings while a file is read.

    Warnings filters and logger levels are process-wide, so overlapping reads (threads) share one
    silence: the first to enter sets it, the last to leave restores it.
    """
    with _quiet_lock:
        if _quiet_state["depth"] == 0:
            loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
            _quiet_state["levels"] = [(lg, lg.level) for lg in loggers]
            for lg in loggers:
                lg.setLevel(logging.CRITICAL + 1)
            _quiet_state["warnings"] = warnings.catch_warnings()
            _quiet_state["warnings"].__enter__()
            warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        _quiet_state["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                _quiet_state.pop("warnings").__exit__(None, None, None)
                for lg, level in _quiet_state.pop("levels"):
                    lg.setLevel(level)


# --------------------------------------------------------------------------- header


@dataclass
class DicomFile:
    """A DICOM file read up to its pixel data; :func:`load_pixels` adds the pixel data element.

    Attributes:
        ds: the pydicom data set (header; ``PixelData`` once loaded).
        pixel_at: offset of the top-level pixel data element in ``buf`` (None: there is none).
        expected_bytes: what Rows × Columns × frames × samples × BitsAllocated need.
    """

    ds: Any
    buf: bytes | bytearray
    pixel_at: int | None
    implicit: bool
    little: bool
    inflater: Inflater | None = None
    expected_bytes: int = 0

    @property
    def syntax(self) -> Any:
        return self.ds.file_meta.TransferSyntaxUID

    @property
    def frames(self) -> int:
        return header_int(self.ds.get("NumberOfFrames"), default=1)


def read_header(data: bytes, *, max_pixels: int, policy: AdmissionPolicy | None = None) -> DicomFile:
    """Read the header (never the pixel data); judge it by ``policy``, then the image it promises by ``max_pixels``.

    Raises:
        OutOfPolicy: a readable file outside ``policy`` (a CT, a lateral, a multi-frame, …).
        BadImage: ``not_dicom``, ``truncated`` (cut inside the header), ``dicom_no_pixels``,
            ``unsupported_mode`` (float pixel data), ``corrupt_pixel_data`` (no image size),
            ``too_large_image`` (the header promises more than ``max_pixels``), ``decompression_bomb``
            (a deflated header that never ends).
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble  # no public API reads the meta alone

    with quiet_pydicom(), header_errors():
        fp = io.BytesIO(data)
        preamble = read_preamble(fp, force=True)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == DEFLATED:
            dcm = _deflated_header(data[fp.tell():], preamble, meta)
        else:
            dcm = _plain_header(data)
        _check_pixel_element(dcm)
        if policy is not None:
            policy.check(dcm.ds)
        dcm.expected_bytes = _check_budget(dcm.ds, max_pixels)
    return dcm


@contextmanager
def header_errors() -> Iterator[None]:
    """What pydicom raises on a damaged header (when parsing, or later when a value is first read) as BadImage."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        yield
    except (EOFError, struct.error):
        raise BadImage("truncated", "the file ends inside the DICOM header") from None
    except (InvalidDicomError, BytesLengthException, OSError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, NotImplementedError, OverflowError) as exc:
        raise BadImage("not_dicom", f"DICOM signature, but the header does not parse ({type(exc).__name__})") from None


def _plain_header(data: bytes) -> DicomFile:
    import pydicom

    fp = io.BytesIO(data)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    _ensure_transfer_syntax(ds)
    implicit, little = ds.original_encoding[:2]
    at = fp.tell()
    return DicomFile(ds, data, at if tag_at(data, at, little) in _PIXEL_TAGS else None, bool(implicit), bool(little))


def _deflated_header(compressed: bytes, preamble: bytes | None, meta: Any) -> DicomFile:
    """Inflate the data set in growing steps until the header (up to the pixel data) is complete."""
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    inflater = Inflater(compressed)
    size = 64 << 10
    while True:
        inflater.grow(size)
        buf = bytes(inflater.out)
        fp = DicomBytesIO(buf)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        try:
            ds = read_dataset(fp, False, True, stop_when=lambda tag, *_: int(tag) in _PIXEL_TAGS)
        except (EOFError, struct.error):
            if inflater.finished:
                raise
            ds = None  # the header goes on beyond what is inflated so far
        at = fp.tell()
        if ds is not None and (tag_at(buf, at, True) in _PIXEL_TAGS and len(buf) >= at + 12 or inflater.finished):
            break
        if size >= MAX_HEADER_BYTES:
            raise BadImage("decompression_bomb", f"the deflated header inflates beyond {MAX_HEADER_BYTES} bytes")
        size *= 4
    meta = meta.copy()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated body is
    fds = FileDataset("", ds, preamble=preamble, file_meta=meta, is_implicit_VR=False, is_little_endian=True)
    fds.set_original_encoding(False, True, ds._character_set)
    pixel_at = at if tag_at(buf, at, True) in _PIXEL_TAGS else None
    return DicomFile(fds, inflater.out, pixel_at, False, True, inflater=inflater)


def _ensure_transfer_syntax(ds: Any) -> None:
    """Give a data set read without file meta the (uncompressed) transfer syntax it was parsed with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))[:2]
    if implicit is None:
        implicit, little = getattr(ds, "is_implicit_VR", True), getattr(ds, "is_little_endian", True)
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def _check_pixel_element(dcm: DicomFile) -> None:
    if dcm.pixel_at is None:
        if _cut_short(dcm):
            raise BadImage("truncated", "the file ends inside the DICOM header")
        if "Rows" in dcm.ds and "Columns" in dcm.ds:  # the Image Pixel module without its pixel data
            raise BadImage("truncated", "the header describes an image, but the file ends before its pixel data")
        if _unrecognisable(dcm.ds):
            raise BadImage("not_dicom", "DICOM signature, but no SOP, study, patient or image element follows")
        raise BadImage("dicom_no_pixels", "DICOM file has no PixelData element")
    tag = tag_at(dcm.buf, dcm.pixel_at, dcm.little)
    if tag != 0x7FE00010:
        raise BadImage("unsupported_mode", f"DICOM {_PIXEL_TAGS.get(tag or 0, 'pixel data')} (integer pixels expected)")


def _unrecognisable(ds: Any) -> bool:
    """Elements were read, but none a DICOM file or directory holds: bytes after a "DICM" signature."""
    elements = [tag for tag in ds.keys() if tag.group > 0]
    meta = getattr(ds, "file_meta", None)
    return bool(elements) and not (meta is not None and "MediaStorageSOPClassUID" in meta) and not any(
        tag in ds for tag in _IDENTIFYING) and not any(tag.group == 0x0004 for tag in elements)


def _cut_short(dcm: DicomFile) -> bool:
    """Whether the file ends inside a header element (its value, or the 8-byte header of the next one)."""
    meta = getattr(dcm.ds, "file_meta", None) or {}
    ends = [end for ds in (meta, dcm.ds) for end in _element_ends(ds)]
    if any(end is None for end in ends):
        return True
    if dcm.inflater is not None:  # the inflated body: its elements are checked above, its end by the inflater
        return False
    if meta.get("FileMetaInformationGroupLength") is not None:
        meta_end = meta["FileMetaInformationGroupLength"].file_tell + 4 + int(meta.FileMetaInformationGroupLength)
        if len(dcm.buf) < meta_end:
            return True
        ends.append(meta_end)
    last = max((end for end in ends if end is not None), default=None)
    return last is not None and 0 < len(dcm.buf) - last < 8


def _element_ends(ds: Any) -> Iterator[int | None]:
    """Offset after each raw element of defined length; None for one holding fewer bytes than it declares."""
    from pydicom.dataelem import RawDataElement

    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes) and elem.length != 0xFFFFFFFF:
            yield None if len(elem.value) < elem.length else elem.value_tell + elem.length


def _check_budget(ds: Any, max_pixels: int) -> int:
    """Bytes the decoded pixel data will take; refuse before decoding what exceeds ``max_pixels``."""
    rows, cols = header_int(ds.get("Rows")), header_int(ds.get("Columns"))
    frames, samples = header_int(ds.get("NumberOfFrames"), 1), header_int(ds.get("SamplesPerPixel"), 1)
    bits = header_int(ds.get("BitsAllocated"))
    if rows <= 0 or cols <= 0 or frames <= 0 or samples <= 0:
        raise BadImage("corrupt_pixel_data", f"header gives no image size ({cols}x{rows}, {frames} frames)")
    if bits not in (1, 8, 16, 32, 64):
        raise BadImage("corrupt_pixel_data", f"BitsAllocated={bits} (1, 8, 16, 32 or 64 expected)")
    values = rows * cols * frames * samples
    nbytes = (values * bits + 7) // 8
    if values > max_pixels or nbytes > BYTES_PER_PIXEL_BUDGET * max_pixels:
        raise BadImage("too_large_image", f"{cols}x{rows}, {frames} frame(s) x {samples} sample(s) x {bits} bit "
                                             f"({nbytes} bytes) exceeds {max_pixels} pixels")
    return nbytes


# --------------------------------------------------------------------------- pixels


def load_pixels(dcm: DicomFile) -> None:
    """Attach the pixel data element (inflating within budget); ``truncated`` when it ends early."""
    from pydicom.dataelem import DataElement

    if "PixelData" in dcm.ds:
        return
    assert dcm.pixel_at is not None  # read_header refuses files without pixel data
    if dcm.inflater is not None:
        limit = dcm.pixel_at + 12 + dcm.expected_bytes + 1 + TRAILER_SLACK
        dcm.inflater.grow(limit + 1)
        if len(dcm.inflater.out) > limit:
            raise BadImage("decompression_bomb", f"the deflated data set inflates beyond the {limit} bytes "
                                                 "its header declares")
        dcm.buf = dcm.inflater.out
    vr, start, length = element_header(dcm.buf, dcm.pixel_at, implicit=dcm.implicit, little=dcm.little)
    encapsulated = dcm.syntax.is_encapsulated
    if length == 0xFFFFFFFF:
        if not encapsulated:
            raise BadImage("corrupt_pixel_data", f"native pixel data ({dcm.syntax.name}) with undefined length")
        end = encapsulated_end(dcm.buf, start, dcm.little)
        value = bytes(memoryview(dcm.buf)[start:end])
    else:
        if encapsulated:
            raise BadImage("corrupt_pixel_data", f"{dcm.syntax.name} pixel data must be encapsulated")
        available = len(dcm.buf) - start
        if available < min(length, dcm.expected_bytes):
            raise BadImage("truncated", f"pixel data ends after {available} of {length} bytes")
        if length < dcm.expected_bytes:
            raise BadImage("truncated", f"{length} bytes of pixel data, {dcm.expected_bytes} needed for the "
                                        "image size in the header")
        needed = dcm.expected_bytes + (dcm.expected_bytes & 1)  # an odd length is padded to even
        value = bytes(memoryview(dcm.buf)[start:start + min(length, needed)])
    if vr is None:
        vr = "OB" if encapsulated or header_int(dcm.ds.get("BitsAllocated")) <= 8 else "OW"
    dcm.ds.add(DataElement(0x7FE00010, vr, value, is_undefined_length=length == 0xFFFFFFFF))


def stored_pixels(dcm: DicomFile) -> np.ndarray:
    """Decode the pixel data as stored (no LUTs); loads it first if needed.

    Raises:
        BadImage: ``no_decoder``, ``corrupt_pixel_data``, ``truncated``, ``decompression_bomb``.
    """
    with quiet_pydicom():
        _require_decoder(dcm.syntax)
        with header_errors():
            load_pixels(dcm)
        if dcm.syntax == RLE:
            _check_rle_segments(dcm)
        elif dcm.syntax.is_encapsulated:
            _check_codestream(dcm)
        try:
            return dcm.ds.pixel_array
        except (MemoryError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - plugins raise anything on a corrupt stream; the Rust
            # ones (pylibjpeg-rle) panic with pyo3's PanicException, which is not an Exception
            text = "; ".join(line.strip() for line in str(exc).splitlines()
                             if line.strip() and not line.startswith("Unable to decode as exceptions"))
            detail = f"{dcm.syntax.name}: {type(exc).__name__}: {text}"
            raise BadImage("corrupt_pixel_data", detail[:240]) from None


def _require_decoder(syntax: Any) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    name = f"transfer syntax {syntax} ({syntax.name})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        known = "" if syntax.is_transfer_syntax else " (not a transfer syntax pydicom knows)"
        raise BadImage("no_decoder", f"{name}{known}: pydicom has no decoder for it; export the images "
                                     "uncompressed, JPEG 2000 or JPEG-LS (e.g. dcmtk `dcmconv +te`, "
                                     "`gdcmconv --raw`)") from None
    if not decoder.is_available:
        package = _PLUGINS.get(str(syntax), "a pydicom pixel data plugin")
        raise BadImage("no_decoder", f"{name}: no decoder installed; install {package} (xrayops dependencies: "
                                     "`uv sync`)")


def _check_rle_segments(dcm: DicomFile) -> None:
    from pydicom.encaps import generate_frames

    size = header_int(dcm.ds.get("Rows")) * header_int(dcm.ds.get("Columns"))
    for index, frame in enumerate(generate_frames(dcm.ds.PixelData, number_of_frames=dcm.frames)):
        check_rle_frame(frame, size, index)


def _check_codestream(dcm: DicomFile) -> None:
    """The first frame's JPEG / JPEG-LS / JPEG 2000 header must give the DICOM header's size."""
    from pydicom.encaps import generate_fragments

    fragments = generate_fragments(dcm.ds.PixelData)
    next(fragments, None)  # the basic offset table
    size = codestream_size(next(fragments, b""))
    rows, cols = header_int(dcm.ds.get("Rows")), header_int(dcm.ds.get("Columns"))
    if size is not None and size != (cols, rows):
        raise BadImage("corrupt_pixel_data", f"the codestream is {size[0]}x{size[1]}, the header says {cols}x{rows}")


# --------------------------------------------------------------------------- radiographs

# Fields that may leave the reader. Everything else (names, dates, accession numbers,
# institutions, physicians, addresses, free text, private tags) is dropped here.
SAFE_FIELDS = {
    "ViewPosition": "view_position",
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "PhotometricInterpretation": "photometric",
    "BodyPartExamined": "body_part",
}


def decode_dicom(data: bytes, *, max_pixels: int, bit_depth: int, policy: AdmissionPolicy | None = None
                 ) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    """One grayscale frame as ``bit_depth``-bit display values, the PHI-free header fields and the raw identifiers.

    Files outside ``policy`` (:mod:`pipeline.data.policy`), multi-frame and colour files are
    refused from the header, before their pixel data is read.

    Raises:
        OutOfPolicy: outside ``policy``.
        BadImage: any reason of :func:`read_header` and :func:`stored_pixels`; ``unsupported_mode``.
    """
    with quiet_pydicom():
        dcm = read_header(data, max_pixels=max_pixels, policy=policy)
        ds = dcm.ds
        with header_errors():
            if dcm.frames > 1:
                raise BadImage("unsupported_mode", f"DICOM with {dcm.frames} frames (multi-frame not supported)")
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip()
            if not photometric.startswith("MONOCHROME"):
                raise BadImage("unsupported_mode", f"DICOM photometric {photometric} (expected MONOCHROME1/2)")
            meta = {key: str(ds.get(tag, "") or "").strip() or None for tag, key in SAFE_FIELDS.items()}
            identifiers = {
                "patient_id": str(ds.get("PatientID", "") or "").strip(),
                "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or "").strip(),
            }
        raw = stored_pixels(dcm)
        if raw.ndim != 2:
            raise BadImage("unsupported_mode", f"DICOM pixels with shape {raw.shape} (one grayscale frame expected)")
        with header_errors():  # rescale and window values are first read here
            return _display_values(raw, ds, bit_depth, photometric), meta, identifiers


def _display_values(raw: np.ndarray, ds: Any, bit_depth: int, photometric: str) -> np.ndarray:
    """Modality LUT, VOI LUT / window, MONOCHROME1 inversion, scaled to ``bit_depth`` bits."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = apply_modality_lut(raw, ds)
    arr = apply_voi_lut(arr, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else arr
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    top = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(scaled * top).astype(dtype)
