"""The input gate: what a clinical image upload must be before a model sees it.

Content is sniffed (never the file name), decoded by the same decoder as ingestion (DICOM
headers reduced to a PHI-free whitelist there), and checked for size, pixel count
(decompression bombs), colour, minimum side and aspect ratio. Every rejection carries a
stable ``reason`` code and an HTTP status.
"""

from __future__ import annotations

from pipeline.config import ServeSection
from pipeline.data.imaging import BadImage, DecodedImage, decode_bytes
from pipeline.data.policy import AdmissionPolicy, OutOfPolicy
from pipeline.errors import Rejected

_FROM_DECODER = {
    "empty_file": "empty",
    "not_an_image": "not_an_image",
    "truncated": "corrupt",
    "dicom_no_pixels": "corrupt",
    "decompression_bomb": "too_many_pixels",
    "too_large_image": "too_many_pixels",
    "unsupported_mode": "unsupported_image",
    "no_decoder": "unsupported_image",
    "corrupt_pixel_data": "corrupt",
    "not_dicom": "corrupt",
}


def admit(data: bytes, cfg: ServeSection, *, dicom_bit_depth: int = 8,
          policy: AdmissionPolicy | None = None) -> DecodedImage:
    """Decode and check one upload; a DICOM upload is judged by ``policy`` (``data.admission``, the rule
    ingestion applies) from its header, before any pixel is decoded.

    Raises:
        Rejected: with a reason code from :data:`pipeline.errors.REJECTION_REASONS`.
    """
    if len(data) > cfg.max_upload_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > serve.max_upload_bytes={cfg.max_upload_bytes}")
    try:
        image = decode_bytes(data, max_pixels=cfg.max_pixels, dicom_bit_depth=dicom_bit_depth, dicom_policy=policy)
    except OutOfPolicy as exc:
        raise Rejected("out_of_policy", f"{exc.reason}: {exc.detail}") from None
    except BadImage as exc:
        raise Rejected(_FROM_DECODER.get(exc.reason, "corrupt"), exc.detail or exc.reason) from None
    image.identifiers.clear()  # raw DICOM identifiers are never needed (nor kept) by serving
    if image.channels != 1:
        raise Rejected("colour_photograph", f"{image.channels}-channel colour image; expected a grayscale radiograph")
    w, h = image.width, image.height
    if min(w, h) < cfg.min_side:
        raise Rejected("too_small", f"{w}x{h}: shorter side below serve.min_side={cfg.min_side}")
    if max(w, h) / max(1, min(w, h)) > cfg.max_aspect:
        raise Rejected("implausible_geometry", f"{w}x{h}: aspect {max(w, h) / min(w, h):.2f} > "
                                               f"serve.max_aspect={cfg.max_aspect}")
    return image
