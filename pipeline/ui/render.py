"""Pure helpers of the clinician app: settings from the environment, display images, Grad-CAM blending."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from pipeline.config import Settings, load_settings
from pipeline.data.imaging import DecodedImage

SETS_ENV = "XRAYOPS_UI_SETS"  # JSON list of section.field=value overrides passed by `xrayops ui`
DISPLAY_SIDE = 512


def ui_settings() -> Settings:
    """Settings of the app: params.yaml from $XRAYOPS_PARAMS (or the project), overrides from $XRAYOPS_UI_SETS."""
    sets = json.loads(os.environ.get(SETS_ENV) or "[]")
    return load_settings(None, list(sets))


def display_gray(image: DecodedImage, side: int = DISPLAY_SIDE) -> np.ndarray:
    """uint8 grayscale view of the image, longest side at most ``side`` pixels."""
    gray = np.clip(image.gray01() * 255.0, 0, 255).astype(np.uint8)
    im = Image.fromarray(gray)
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return np.asarray(im)


def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map of values in [0, 1] → float RGB in [0, 1] (no matplotlib needed)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.clip(np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2), 1.5 - np.abs(4 * v - 1)],
                                  axis=-1), 0.0, 1.0)


def blend(gray_u8: np.ndarray, heatmap: np.ndarray, opacity: float) -> np.ndarray:
    """Heatmap (any size, [0, 1]) resized onto the grayscale image and alpha-blended; uint8 RGB."""
    h, w = gray_u8.shape
    heat = np.asarray(Image.fromarray(np.asarray(heatmap, np.float32), mode="F").resize((w, h),
                                                                                       Image.Resampling.BILINEAR))
    base = np.repeat((gray_u8.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
    alpha = float(np.clip(opacity, 0.0, 1.0))
    out = (1 - alpha) * base + alpha * jet(heat)
    return np.round(out * 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
