"""Training and serving feed a model the same input for the same file.

Training path: raw file → ingestion (``read_one``: decode, de-identify, store) → the training input
pipeline (``load_images``, i.e. ``decode_resize`` in ``tf.data``). Serving path: the same raw bytes →
admission (``admit``) → ``Predictor.preprocess``, wired as the API does it. Both must agree within
1/255 on every kind of file a hospital sends: 8-bit and 16-bit PNG, JPEG, grayscale images in 8- and
16-bit colour files, DICOM (MONOCHROME2 and windowed MONOCHROME1, stored at 8 or 16 bits), non-square,
smaller and larger than the model input, for 1- and 3-channel models.

The mutants show the check can fail: each re-creates one way the paths used to (or could) drift.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Settings
from pipeline.data.reader import IngestOptions, read_one
from pipeline.data.sources.base import XRAY_PROFILE, RawRecord
from pipeline.serving.admission import admit
from pipeline.serving.predictor import Predictor
from pipeline.training.inputs import InputSpec, check_files, load_images
from tests.data.helpers import dicom_bytes, xray

TOL = 1 / 255
SPECS = (InputSpec(128, 1, 2), InputSpec(150, 3, 2))  # the zoo's 1-channel (xray_cnn) and 3-channel (q9_cnn) inputs
SIDES = ((96, 80), (300, 200), (100, 190))  # (h, w): below, above and across the model sizes; none square


def _encode(pixels: np.ndarray, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _tinted(gray: np.ndarray) -> np.ndarray:
    """RGB with green and blue 2 levels above red: still a grayscale radiograph to admission."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.int16)
    rgb[..., 1:] += 2
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _png16_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one; it reads one as 8-bit RGB)."""
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.astype(">u2").view(np.uint8).reshape(h, -1)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))


def raw_files() -> dict[str, bytes]:
    """``kind/HxW`` → file bytes, one of each kind per size."""
    files = {}
    for i, (h, w) in enumerate(SIDES):
        img = xray(i, side=max(h, w))[:h, :w]
        u8 = np.round(img * 255).astype(np.uint8)
        files |= {
            f"png8/{h}x{w}": _encode(u8),
            f"png16/{h}x{w}": _encode(np.round(img * 65535).astype(np.uint16)),
            f"jpeg/{h}x{w}": _encode(u8, "JPEG", quality=92),
            f"jpeg_rgb/{h}x{w}": _encode(np.repeat(u8[..., None], 3, axis=-1), "JPEG", quality=92),
            f"png_rgb_tinted/{h}x{w}": _encode(_tinted(u8)),
            # 16-bit channels: high bytes as in png_rgb_tinted, low bytes not zero
            f"png16_rgb_tinted/{h}x{w}": _png16_rgb(_tinted(u8).astype(np.uint16) * 256 + u8[..., None]),
            f"dicom_mono2/{h}x{w}": dicom_bytes(img, patient_id="P1"),
            f"dicom_mono1/{h}x{w}": dicom_bytes(img, patient_id="P1", photometric="MONOCHROME1",
                                                window=(2000.0, 3000.0)),
        }
    return files


def max_differences(root: Path, settings: Settings, files: dict[str, bytes]) -> dict[tuple[str, int], float]:
    """``(kind/HxW, channels)`` → max |training input − serving input| over the model input."""
    ingest = settings.data.ingest
    opts = IngestOptions(source="parity", classes=("NORMAL", "PNEUMONIA"), profile=XRAY_PROFILE, salt=b"salt",
                         min_size=XRAY_PROFILE.min_size, max_pixels=ingest.max_pixels, max_bytes=ingest.max_bytes,
                         dicom_bit_depth=ingest.dicom_bit_depth, workers=1)
    dataset, rels = root / "dataset", []
    for n, (name, data) in enumerate(files.items()):
        raw = root / "raw" / f"{n}.bin"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_bytes(data)
        outcome = read_one(RawRecord(raw, raw.name, "NORMAL", f"P{n}"), dataset, opts)
        assert outcome.row is not None, (name, outcome.quarantine)
        rels.append(outcome.row["path"])
    paths = check_files(dataset, rels)
    out = {}
    for spec in SPECS:
        trained = load_images(paths, spec)
        predictor = Predictor(None, spec, None, "parity", "1", ["NORMAL", "PNEUMONIA"], engine=object())
        for name, data, x_train in zip(files, files.values(), trained, strict=True):
            image = admit(data, settings.serve, dicom_bit_depth=ingest.dicom_bit_depth)  # as InferenceService
            x_serve = predictor.preprocess(image, image.gray01())
            assert x_serve.shape == x_train.shape == (spec.image_size, spec.image_size, spec.channels)
            out[(name, spec.channels)] = float(np.abs(x_train - x_serve).max())
    return out


def _table(diffs: dict[tuple[str, int], float]) -> str:
    return "\n".join(f"{name} ch={ch}: {d * 255:.4f}/255" for (name, ch), d in sorted(diffs.items()))


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Callable[[int], Settings]:
    return lambda depth: make_settings(f"data.ingest.dicom_bit_depth={depth}")


@pytest.mark.parametrize("dicom_bit_depth", [8, 16])
def test_training_and_serving_inputs_agree_within_one_grey_level(
        tmp_path: Path, settings: Callable[[int], Settings], dicom_bit_depth: int) -> None:
    files = raw_files()
    if dicom_bit_depth == 16:  # only DICOM depends on it
        files = {k: v for k, v in files.items() if k.startswith("dicom")}
    diffs = max_differences(tmp_path, settings(dicom_bit_depth), files)
    assert len(diffs) == len(files) * len(SPECS)
    assert max(diffs.values()) <= TOL, _table(diffs)


def _linked_colour_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingestion links colour files as they are: TensorFlow then reduces RGB with its own luminance
    weights (1 channel) or keeps the channels (3), while serving reads the decoder's grayscale."""
    import pipeline.data.reader as reader

    store = reader.store_image
    monkeypatch.setattr(reader, "store_image",
                        lambda image, *a: store(dataclasses.replace(image, gray_from_colour=False), *a))


def _fast_jpeg_dct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training decodes JPEG with TensorFlow's default (fast integer) DCT, Pillow with the accurate one."""
    import pipeline.training.preprocess as preprocess

    monkeypatch.setattr(preprocess, "JPEG_DCT_METHOD", "")


def _serving_resize_without_antialias(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving resizes on its own (bilinear without antialiasing) instead of the shared function."""
    import tensorflow as tf

    import pipeline.serving.predictor as predictor
    from pipeline.training.preprocess import unit_pixels

    def resize(image: Any, size: int, channels: int, gray01: Any = None) -> np.ndarray:
        px = unit_pixels(image, channels, gray01)
        px = np.repeat(px, channels, axis=-1) if px.shape[-1] != channels else px
        return tf.clip_by_value(tf.image.resize(px, (size, size)), 0.0, 1.0).numpy()

    monkeypatch.setattr(predictor, "preprocess_decoded", resize)


@pytest.mark.parametrize(("mutant", "kinds"), [
    (_linked_colour_files, ("png_rgb_tinted", "png16_rgb_tinted")),
    (_fast_jpeg_dct, ("jpeg", "jpeg_rgb")),
    (_serving_resize_without_antialias, ("png8",)),
], ids=["luminance-weights-of-linked-colour-files", "tf-default-jpeg-dct", "serving-resize-without-antialias"])
def test_the_parity_check_catches_a_drifted_path(
        tmp_path: Path, settings: Callable[[int], Settings], monkeypatch: pytest.MonkeyPatch,
        mutant: Callable[[pytest.MonkeyPatch], None], kinds: tuple[str, ...]) -> None:
    mutant(monkeypatch)
    files = {k: v for k, v in raw_files().items() if k.split("/")[0] in kinds}
    diffs = max_differences(tmp_path, settings(8), files)
    for spec in SPECS:  # caught for 1- and 3-channel models alike
        assert max(d for (_, ch), d in diffs.items() if ch == spec.channels) > TOL, _table(diffs)
