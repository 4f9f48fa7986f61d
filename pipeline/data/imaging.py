"""Decode image files (PNG, JPEG, DICOM) into arrays, with reasons for rejection.

One decoder serves ingestion, serving and the clinician UI so that an image is read
the same way everywhere. DICOM files are read by :mod:`pipeline.data.dicom` (bounded
memory, every common transfer syntax), whose headers are reduced to a short whitelist
there: PHI tags (names, dates, accession numbers, institutions, ...) never leave the reader,
and the only identifiers that do (patient id, SOP instance UID) are handed to the
caller for pseudonymisation in :class:`DecodedImage.identifiers`, never stored as is.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.dicom import decode_dicom
from pipeline.data.png_inflate import PNG_SIGNATURE, with_stored_pixels
from pipeline.data.policy import AdmissionPolicy
from pipeline.errors import BadImage

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_INFLATERS = ("isal", "pillow")


@dataclass
class DecodedImage:
    """Pixels plus PHI-free metadata.

    Attributes:
        pixels: ``(H, W)`` grayscale or ``(H, W, 3)`` colour, uint8 or uint16.
        bit_depth: 8 or 16.
        format: ``png``, ``jpeg`` or ``dicom``.
        meta: PHI-free header fields (view_position, modality, manufacturer, photometric).
        identifiers: raw identifiers (patient_id, sop_instance_uid) — pseudonymise before storing.
        gray_from_colour: the file is a colour, palette or alpha PNG/JPEG holding a grayscale image, read
            as its first channel, so another decoder may read the file differently (ingestion stores
            these pixels instead, :mod:`pipeline.data.image_store`: training reads what serving decodes).
    """

    pixels: np.ndarray
    bit_depth: int
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    identifiers: dict[str, str] = field(default_factory=dict)
    gray_from_colour: bool = False

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else int(self.pixels.shape[2])

    def gray01(self) -> np.ndarray:
        """Float32 grayscale in [0, 1] (luminance for colour images)."""
        scale = np.float32(1.0 / ((1 << self.bit_depth) - 1))
        if self.pixels.ndim == 3:
            px = self.pixels.astype(np.float32) * scale
            return px[..., 0] * 0.299 + px[..., 1] * 0.587 + px[..., 2] * 0.114
        return np.multiply(self.pixels, scale, dtype=np.float32)  # one pass, no float64 temporary


def sniff_format(head: bytes) -> str | None:
    """Identify the container from its first bytes (never from the file name)."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _looks_like_bare_dicom(head):
        return "dicom"
    return None


# Groups a DICOM data set written without the 128-byte preamble usually starts with
# (file meta, identification, patient, acquisition, relationship, image pixel module).
_FIRST_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
        b"UR", b"US", b"UT", b"UV"}


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM data set without preamble/"DICM" (e.g. ``Dataset.save_as`` without file meta)."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    if group not in _FIRST_GROUPS:
        return False
    if head[4:6] in _VRS:  # explicit VR little endian
        return True
    return int.from_bytes(head[4:8], "little") < 1 << 20  # implicit VR: a plausible value length


def decode_bytes(data: bytes, *, max_pixels: int, dicom_bit_depth: int = 8,
                 png_inflate: str = "isal", dicom_policy: AdmissionPolicy | None = None) -> DecodedImage:
    """Decode an image from bytes; a DICOM file is first judged by ``dicom_policy`` (from its header).

    ``png_inflate="isal"`` inflates PNG pixel data with ISA-L (:mod:`pipeline.data.png_inflate`:
    same pixels, faster); ``"pillow"`` leaves all of it to Pillow.

    Raises:
        BadImage: empty, not an image, truncated, too many pixels, unsupported mode; for DICOM also
            not_dicom, dicom_no_pixels, no_decoder, corrupt_pixel_data (:mod:`pipeline.data.dicom`).
        OutOfPolicy: a DICOM file outside ``dicom_policy`` (:mod:`pipeline.data.policy`).
    """
    if png_inflate not in PNG_INFLATERS:
        raise ValueError(f"png_inflate must be one of {PNG_INFLATERS}, not {png_inflate!r}")
    if not data:
        raise BadImage("empty_file", "the file has 0 bytes")
    kind = sniff_format(data[:256])
    if kind == "dicom":
        return _decode_dicom(data, max_pixels=max_pixels, bit_depth=dicom_bit_depth, policy=dicom_policy)
    if kind is None:
        raise BadImage("not_an_image", "content is not PNG, JPEG or DICOM (checked by content, not name)")
    return _decode_raster(data, kind, max_pixels=max_pixels, fast=png_inflate == "isal")


def _decode_raster(data: bytes, kind: str, *, max_pixels: int, fast: bool) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)  # Pillow's bomb check is stricter
            stored = with_stored_pixels(data, max_pixels=limit) if fast and kind == "png" else None
            im = Image.open(io.BytesIO(data if stored is None else stored))
            width, height = im.size
            if width * height > max_pixels:
                raise BadImage("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
            im.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage("decompression_bomb", str(exc)[:120]) from None
    except UnidentifiedImageError:
        raise BadImage("not_an_image", f"{kind} signature but unreadable header") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage("truncated", f"cannot decode {kind}: {str(exc)[:120]}") from None
    return _from_pil(im, kind)


def _from_pil(im: Image.Image, kind: str) -> DecodedImage:
    mode = im.mode
    if mode == "L":
        return DecodedImage(np.asarray(im, dtype=np.uint8), 8, kind)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise BadImage("unsupported_mode", f"{mode} values outside 0..65535")
        return DecodedImage(arr.astype(np.uint16), 16, kind)
    if mode in ("LA", "P", "PA", "RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if _is_gray(rgb):
            return DecodedImage(np.ascontiguousarray(rgb[..., 0]), 8, kind, gray_from_colour=True)
        return DecodedImage(rgb, 8, kind)
    raise BadImage("unsupported_mode", f"pixel mode {mode} (expected grayscale 8/16-bit or RGB)")


def _is_gray(rgb: np.ndarray, tol: int = 2) -> bool:
    sample = rgb[:: max(1, rgb.shape[0] // 64), :: max(1, rgb.shape[1] // 64)].astype(np.int16)
    return bool(np.abs(sample[..., 0] - sample[..., 1]).max() <= tol
                and np.abs(sample[..., 0] - sample[..., 2]).max() <= tol)


# --------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, *, max_pixels: int, bit_depth: int, policy: AdmissionPolicy | None) -> DecodedImage:
    pixels, meta, identifiers = decode_dicom(data, max_pixels=max_pixels, bit_depth=bit_depth, policy=policy)
    return DecodedImage(pixels, bit_depth, "dicom", meta=meta, identifiers=identifiers)


def encode_png(image: DecodedImage) -> bytes:
    """Lossless PNG of the decoded pixels (used to store de-identified DICOM pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.pixels)).save(buf, format="PNG")  # uint16 → mode I;16
    return buf.getvalue()
