"""Per-image features shared by ingestion, the training reference profile, serving and monitoring.

Monitoring compares like with like only if every place computes features with the same
code: :func:`image_features` is that code. Features are computed on a fixed-size
grayscale view of the image (so resolution changes show up in width/height, not in
every other feature) and never contain pixels or identifiers.
"""

from __future__ import annotations

import math

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
    """Square ``side`` x ``side`` float32 view of a float image (bilinear; whole-factor box
    reduction first, as Pillow's ``reducing_gap`` does)."""
    if gray01.shape == (side, side):
        return gray01.astype(np.float32, copy=False)
    im = Image.fromarray(np.ascontiguousarray(gray01, dtype=np.float32), mode="F")
    return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=1.0), dtype=np.float32)


def _levels(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """Integer pixels at ``bit_depth``: uint8/uint16 pass through; [0, 1] floats are quantized."""
    if image.dtype.kind in "ui":
        return image
    top = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth <= 8 else np.uint16
    return np.clip(np.rint(image * np.float32(top)), 0, top).astype(dtype)


def feature_view(image: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """The fixed-size grayscale view (float32 in [0, 1]) every feature and the pHash use.

    ``image`` is a grayscale image at its original size: integer pixels at ``bit_depth`` or
    the same scaled to [0, 1] (``DecodedImage.gray01()``); both give the same view, because
    floats are first quantized back to ``bit_depth`` levels. 8-bit images are resampled in
    the integer domain by Pillow (fast, releases the GIL), 16-bit ones as floats.
    """
    px = _levels(image, bit_depth)
    top = np.float32(1.0 / ((1 << bit_depth) - 1))
    if px.shape == (FEATURE_SIDE, FEATURE_SIDE):
        return np.multiply(px, top, dtype=np.float32)
    side = (FEATURE_SIDE, FEATURE_SIDE)
    if px.dtype == np.uint8:
        small = Image.fromarray(np.ascontiguousarray(px)).resize(side, Image.Resampling.BILINEAR, reducing_gap=1.0)
        return np.multiply(np.asarray(small), top, dtype=np.float32)
    return _resize01(px.astype(np.float32), FEATURE_SIDE) * top


def _percentiles(hist: np.ndarray, qs: tuple[float, ...], levels: int) -> list[float]:
    """``numpy.percentile`` (linear) of values ``k / (levels - 1)`` given their histogram."""
    cum = np.cumsum(hist)
    n = int(cum[-1])
    out = []
    for q in qs:
        rank = q / 100 * (n - 1)
        lo = int(np.floor(rank))
        a = int(np.searchsorted(cum, lo, side="right"))
        b = int(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
        out.append((a + (b - a) * (rank - lo)) / (levels - 1))
    return out


def image_features(gray01: np.ndarray, *, bit_depth: int, width: int, height: int) -> dict[str, float]:
    """Intensity, texture and geometry features of one image.

    Args:
        gray01: grayscale pixels scaled to [0, 1] (or integer pixels) at their original resolution.
        bit_depth: bits per sample of the stored image.
        width, height: original size in pixels.
    """
    return describe(gray01, bit_depth=bit_depth, width=width, height=height, phash=False)[0]


def describe(image: np.ndarray, *, bit_depth: int, width: int, height: int,
             phash: bool = True) -> tuple[dict[str, float], str | None]:
    """Features (as :func:`image_features`) and, with ``phash``, the :func:`perceptual_hash` of one image.

    This is the one entry point of ingestion (integer pixels) and serving (``gray01``): both
    reach the same code for the same pixels, so production features compare exactly with the
    training reference. 8-bit images take a fast path on the 256-level view (Pillow resize and
    histogram, integer Laplacian: a few large GIL-free calls instead of many small NumPy ones);
    16-bit images use the float view (:func:`view_features`).
    """
    px = _levels(image, bit_depth)
    if px.dtype != np.uint8:
        view = feature_view(px, bit_depth)
        return (view_features(view, bit_depth=bit_depth, width=width, height=height),
                perceptual_hash(view) if phash else None)
    small = Image.fromarray(np.ascontiguousarray(px))
    if small.size != (FEATURE_SIDE, FEATURE_SIDE):
        small = small.resize((FEATURE_SIDE, FEATURE_SIDE), Image.Resampling.BILINEAR, reducing_gap=1.0)
    feats = _u8_features(small, bit_depth=bit_depth, width=width, height=height)
    if not phash:
        return feats, None
    side = (_PHASH_SIDE, _PHASH_SIDE)
    tiny = np.asarray(small.convert("F").resize(side, Image.Resampling.BILINEAR, reducing_gap=1.0), np.float64)
    return feats, _hash_bits(tiny)


_LEVELS01 = np.arange(256, dtype=np.float64) / 255.0


def _u8_features(small: Image.Image, *, bit_depth: int, width: int, height: int) -> dict[str, float]:
    """:func:`view_features` of an 8-bit view given as a Pillow ``L`` image (same values up to rounding)."""
    hist = np.asarray(small.histogram(), dtype=np.int64)
    n = float(hist.sum())
    mean = float(hist @ _LEVELS01) / n
    var = max(0.0, float(hist @ (_LEVELS01 * _LEVELS01)) / n - mean * mean)
    p05, p50, p95 = _percentiles(hist, (5, 50, 95), 256)
    prob = hist[hist > 0] / n
    q = np.asarray(small, dtype=np.int16)
    lap = q[:-2, 1:-1] + q[2:, 1:-1]  # |values| <= 4 * 255: int16 is exact
    lap += q[1:-1, :-2]
    lap += q[1:-1, 2:]
    lap -= q[1:-1, 1:-1] * np.int16(4)
    return _feature_dict(mean, var, (p05, p50, p95), prob, _mean_var(lap.astype(np.float32))[1] / 255.0**2,
                         bit_depth, width, height)


def _feature_dict(mean: float, var: float, pcts: tuple[float, float, float], prob: np.ndarray, lap_var: float,
                  bit_depth: int, width: int, height: int) -> dict[str, float]:
    p05, p50, p95 = pcts
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "p05": float(p05),
        "p50": float(p50),
        "p95": float(p95),
        "contrast": float(p95 - p05),
        "entropy": float(-(prob * np.log2(prob)).sum()),
        "sharpness": lap_var * 1000.0,
        "width": float(width),
        "height": float(height),
        "aspect": float(width / height) if height else 0.0,
        "bit_depth": float(bit_depth),
    }


def view_features(small: np.ndarray, *, bit_depth: int, width: int, height: int) -> dict[str, float]:
    """:func:`image_features` of an image whose :func:`feature_view` is ``small``.

    Percentiles and entropy come from the view's 256-level histogram (percentiles exact to
    1/255); sharpness is the variance of the view's Laplacian.
    """
    levels = 256
    scaled = small * np.float32(levels - 1)
    scaled += np.float32(0.5)
    if not (0.0 <= float(scaled.min()) and float(scaled.max()) < levels):  # views are in [0, 1]; others clip
        np.clip(scaled, 0, levels - 1, out=scaled)
    hist = np.asarray(Image.fromarray(scaled.astype(np.uint8)).histogram(), dtype=np.int64)
    p05, p50, p95 = _percentiles(hist, (5, 50, 95), levels)
    prob = hist[hist > 0] / hist.sum()
    lap = small[:-2, 1:-1] + small[2:, 1:-1]  # the 4 neighbours minus 4x centre (sign does not change the variance)
    lap += small[1:-1, :-2]
    lap += small[1:-1, 2:]
    lap -= small[1:-1, 1:-1] * np.float32(4)
    mean, var = _mean_var(small)
    return _feature_dict(mean, var, (p05, p50, p95), prob, _mean_var(lap)[1], bit_depth, width, height)


def _mean_var(values: np.ndarray) -> tuple[float, float]:
    """Mean and (population) variance in two BLAS passes (float64 accumulation of the mean)."""
    flat = values.ravel()
    mean = float(flat.mean(dtype=np.float64))
    return mean, max(0.0, float(np.dot(flat, flat)) / flat.size - mean * mean)


PHASH_BITS = 256
_PHASH_SIDE, _PHASH_LOW = 64, 16


def _dct_rows(n: int, rows: int) -> np.ndarray:
    """The first ``rows`` rows of the orthonormal DCT-II matrix of size ``n``."""
    k = np.arange(n)
    mat = np.cos(np.pi * (2 * k[None, :] + 1) * k[:rows, None] / (2 * n)) * np.sqrt(2 / n)
    mat[0] /= np.sqrt(2)
    return mat


_DCT = _dct_rows(_PHASH_SIDE, _PHASH_LOW)


def perceptual_hash(gray01: np.ndarray, bit_depth: int = 8) -> str:
    """256-bit DCT perceptual hash as 64 hex digits.

    The 16x16 lowest DCT frequencies of a 64x64 view (taken from the :func:`feature_view`;
    pass that view when you have it), thresholded at their median. A 64-bit (8x8) pHash
    cannot tell chest radiographs of different patients apart (they share the same anatomy);
    256 bits separate them while re-encodings, resizes and small exposure changes of one
    image stay within a few bits.
    """
    view = gray01 if gray01.shape == (FEATURE_SIDE, FEATURE_SIDE) and gray01.dtype.kind == "f" \
        else feature_view(gray01, bit_depth)
    return _hash_bits(_resize01(view, _PHASH_SIDE).astype(np.float64))


def _hash_bits(small: np.ndarray) -> str:
    """Bits of the 16x16 lowest DCT frequencies of a 64x64 view above their median (scale-free)."""
    low = (_DCT @ small @ _DCT.T).ravel()  # == scipy.fft.dctn(small, norm="ortho")[:16, :16]
    ac = np.sort(low[1:])  # 255 values: the median is the middle one (np.median, without its overhead)
    bits = low > ac[ac.size // 2]
    return np.packbits(bits).tobytes().hex()


def hashes_to_bytes(hex_hashes: list[str]) -> np.ndarray:
    """Parse hex pHashes into an ``(n, 32)`` uint8 array."""
    if not hex_hashes:
        return np.zeros((0, PHASH_BITS // 8), np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hex_hashes)), dtype=np.uint8).reshape(len(hex_hashes), -1)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between broadcastable arrays of byte hashes (last axis = bytes)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int32)
