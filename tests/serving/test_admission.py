"""The input gate: content sniffing, limits, colour/geometry checks, DICOM de-identification."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.errors import REJECTION_REASONS as REASONS
from pipeline.errors import Rejected
from pipeline.serving.admission import admit
from tests.data.helpers import PHI, dicom_bytes
from tests.serving.helpers import colour_png, encode, png, xray01


@pytest.fixture
def cfg(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings("serve.max_upload_bytes=200000", "serve.max_pixels=300000", "serve.min_side=64",
                         "serve.max_aspect=3.0")


def test_grayscale_png_jpeg_and_dicom_are_admitted(cfg: Settings) -> None:
    img = admit(png(1), cfg.serve)
    assert (img.format, img.channels, img.width, img.height) == ("png", 1, 64, 64)
    assert admit(encode(xray01(2), "JPEG", quality=90), cfg.serve).format == "jpeg"
    # A grayscale image saved as RGB is still a radiograph, not a colour photograph.
    rgb = np.repeat(np.round(xray01(3) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    assert admit(encode(rgb), cfg.serve).channels == 1


def test_dicom_is_de_identified_on_read(cfg: Settings) -> None:
    data = dicom_bytes(xray01(4, side=96), patient_id="MRN-SECRET-1", phi=PHI, view="AP")
    img = admit(data, cfg.serve)
    assert img.format == "dicom" and img.meta["view_position"] == "AP"
    assert img.identifiers == {}, "serving keeps no raw identifiers"
    text = repr(img.meta)
    assert all(v not in text for v in [*PHI.values(), "MRN-SECRET-1"])


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: b"", "empty"),
    (lambda: b"%PDF-1.4 this is not an image" * 10, "not_an_image"),
    (lambda: png(5)[:200], "corrupt"),
    (colour_png, "colour_photograph"),
    (lambda: png(6, side=32), "too_small"),
    (lambda: encode(np.full((64, 256), 0.5)), "implausible_geometry"),
    (lambda: encode(np.full((600, 600), 0.4)), "too_many_pixels"),
    (lambda: b"\x89PNG\r\n\x1a\n" + bytes(250_000), "too_large"),
])
def test_rejections_carry_a_reason_and_status(cfg: Settings, make: Callable[[], bytes], reason: str) -> None:
    with pytest.raises(Rejected) as info:
        admit(make(), cfg.serve)
    assert info.value.reason == reason
    assert info.value.status == REASONS[reason][0] and 400 <= info.value.status < 500


def test_file_name_plays_no_part(cfg: Settings) -> None:
    """The gate only sees bytes: a JPEG is a JPEG whatever the upload calls it, and text is never an image."""
    assert admit(encode(xray01(7), "JPEG"), cfg.serve).format == "jpeg"
    with pytest.raises(Rejected, match="not_an_image"):
        admit(b"GIF89a" + bytes(500), cfg.serve)
