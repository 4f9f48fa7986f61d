"""Ingestion's fast feature path equals serving's path exactly (monitoring compares like with like)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.features import FEATURE_SIDE, describe, feature_view, image_features, perceptual_hash, view_features
from pipeline.data.imaging import DecodedImage


@pytest.mark.parametrize(("bit_depth", "shape"), [(8, (300, 420)), (8, (64, 64)), (8, (256, 256)),
                                                  (16, (512, 512)), (8, (90, 120, 3))])
def test_ingest_view_gives_the_serving_features(bit_depth: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(bit_depth + len(shape))
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    image = DecodedImage((rng.random(shape) * ((1 << bit_depth) - 1)).astype(dtype), bit_depth, "png")
    # serving: image_features(gray01) ; ingestion: describe() on integer pixels (gray01 for colour)
    serving = image_features(image.gray01(), bit_depth=bit_depth, width=image.width, height=image.height)
    feats, phash = describe(image.pixels if image.channels == 1 else image.gray01(), bit_depth=bit_depth,
                            width=image.width, height=image.height)
    assert feats == serving  # exactly: monitoring compares production with the training reference
    assert phash == perceptual_hash(image.gray01(), bit_depth)
    # the 8-bit fast path and the float view path agree to float32 rounding
    view = feature_view(image.pixels if image.channels == 1 else image.gray01(), bit_depth)
    assert view.shape == (FEATURE_SIDE, FEATURE_SIDE) and view.dtype == np.float32
    slow = view_features(view, bit_depth=bit_depth, width=image.width, height=image.height)
    assert slow == pytest.approx(serving, rel=1e-4, abs=1e-6)
    assert slow["p05"] == serving["p05"] and slow["p95"] == serving["p95"]


def test_percentiles_and_phash_match_their_reference_definitions() -> None:
    from scipy.fft import dctn

    rng = np.random.default_rng(0)
    px = (rng.random((256, 256)) ** 2 * 255).astype(np.uint8)
    view = feature_view(px)
    feats = view_features(view, bit_depth=8, width=256, height=256)
    assert [feats["p05"], feats["p50"], feats["p95"]] == pytest.approx(list(np.percentile(px / 255, [5, 50, 95])))
    assert feats["mean"] == pytest.approx(px.mean() / 255, rel=1e-5)
    from PIL import Image

    small = np.asarray(Image.fromarray(view, mode="F").resize((64, 64), Image.Resampling.BILINEAR,
                                                                 reducing_gap=1.0), np.float64)
    low = dctn(small, norm="ortho")[:16, :16].ravel()
    assert perceptual_hash(view) == np.packbits(low > np.median(low[1:])).tobytes().hex()
