"""Per-image features shared by ingestion, the training reference profile, serving and monitoring.

Monitoring compares like with like only if every place computes features with the same
code: :func:`image_features` is that code. Features are computed on a fixed-size
grayscale view of the image (so resolution changes show up in width/height, not in
every other feature) and never contain pixels or identifiers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FEATURE_SIDE = 256
IMAGE_FEATURES = (
    "mean",
    "std",
    "p05",
    "p50",
    "p95",
    "contrast",
    "entropy",
    "sharpness",
    "width",
    "height",
    "aspect",
    "bit_depth",
)


def _resize01(gray01: np.ndarray, side: int) -> np.ndarray:
    if gray01.shape == (side, side):
        return gray01
    im = Image.fromarray(gray01.astype(np.float32), mode="F")
    return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)


def image_features(gray01: np.ndarray, *, bit_depth: int, width: int, height: int) -> dict[str, float]:
    """Intensity, texture and geometry features of one image.

    Args:
        gray01: grayscale pixels scaled to [0, 1] at their original resolution.
        bit_depth: bits per sample of the stored image.
        width, height: original size in pixels.
    """
    small = _resize01(gray01, FEATURE_SIDE)
    p05, p50, p95 = np.percentile(small, [5, 50, 95])
    hist = np.bincount(np.clip(small * 255, 0, 255).astype(np.int32).ravel(), minlength=256)
    prob = hist[hist > 0] / hist.sum()
    lap = small[1:-1, 1:-1] * 4 - small[:-2, 1:-1] - small[2:, 1:-1] - small[1:-1, :-2] - small[1:-1, 2:]
    return {
        "mean": float(small.mean()),
        "std": float(small.std()),
        "p05": float(p05),
        "p50": float(p50),
        "p95": float(p95),
        "contrast": float(p95 - p05),
        "entropy": float(-(prob * np.log2(prob)).sum()),
        "sharpness": float(lap.var() * 1000.0),
        "width": float(width),
        "height": float(height),
        "aspect": float(width / height) if height else 0.0,
        "bit_depth": float(bit_depth),
    }


PHASH_BITS = 256


def perceptual_hash(gray01: np.ndarray) -> str:
    """256-bit DCT perceptual hash as 64 hex digits.

    The 16x16 lowest DCT frequencies of a 64x64 view, thresholded at their median. A
    64-bit (8x8) pHash cannot tell chest radiographs of different patients apart (they
    share the same anatomy); 256 bits separate them while re-encodings, resizes and small
    exposure changes of one image stay within a few bits.
    """
    from scipy.fft import dctn

    small = _resize01(gray01, 64).astype(np.float64)
    low = dctn(small, norm="ortho")[:16, :16].ravel()
    bits = low > np.median(low[1:])
    return np.packbits(bits).tobytes().hex()


def hashes_to_bytes(hex_hashes: list[str]) -> np.ndarray:
    """Parse hex pHashes into an ``(n, 32)`` uint8 array."""
    if not hex_hashes:
        return np.zeros((0, PHASH_BITS // 8), np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hex_hashes)), dtype=np.uint8).reshape(len(hex_hashes), -1)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between broadcastable arrays of byte hashes (last axis = bytes)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int32)
