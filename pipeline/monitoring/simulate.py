"""Simulated production traffic for the embedded main job and for drift tests.

Held-out test images pass through an acquisition shift (exposure gain/offset, gamma,
noise: a different scanner or protocol) and then through the same path as real
requests: encode → :func:`~pipeline.data.imaging.decode_bytes` → :class:`Predictor` →
log rows with ``source=simulation``. Those rows go to their own log
(:func:`simulation_log_dir`, ``paths.simulation_log``), never to the production log, so
monitoring of real traffic is never fed simulated, half-shifted inputs.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import Settings
from pipeline.data.imaging import decode_bytes
from pipeline.errors import ConfigError
from pipeline.serving.predictor import Predictor, rows_frame
from pipeline.serving.production_log import SIMULATION

logger = logging.getLogger(__name__)


def simulation_log_dir(settings: Settings) -> Path:
    """The simulated-traffic log folder.

    Raises:
        ConfigError: it is the production log, or one holds the other (real and simulated rows would mix).
    """
    simulated, real = settings.simulation_log, settings.production_log
    if simulated == real or simulated in real.parents or real in simulated.parents:
        raise ConfigError(f"paths.simulation_log ({simulated}) must be apart from paths.production_log ({real}): "
                          "simulated traffic would be mixed into the monitoring of real traffic",
                          hint="point paths.simulation_log at its own folder (null = <home>/simulation-log)")
    return simulated


def shift_pixels(gray01: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Apply an acquisition shift of strength ``shift`` (0 = none) to a [0, 1] image."""
    if shift <= 0:
        return gray01
    out = np.clip(gray01 * (1 + 0.35 * shift) + 0.08 * shift, 0, 1) ** max(1 - 0.25 * min(shift, 2), 0.2)
    out = out + rng.normal(0, 0.02 * shift, size=out.shape)
    return np.clip(out, 0, 1)


def simulate_requests(image_paths: list[Path], predictor: Predictor, *, n: int, shift: float,
                      seed: int, shifted_fraction: float = 1.0) -> pd.DataFrame:
    """Score ``n`` images (sampled from ``image_paths``), the first ``shifted_fraction`` of them
    after an acquisition shift; returns production-log rows."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(image_paths), size=n, replace=n > len(image_paths))
    n_shifted = round(n * shifted_fraction)
    decoded, batch = [], []
    for k, i in enumerate(picks):
        source = decode_bytes(image_paths[int(i)].read_bytes(), max_pixels=10**9)
        px = shift_pixels(source.gray01(), shift if k < n_shifted else 0.0, rng)
        buf = io.BytesIO()
        Image.fromarray(np.round(px * 255).astype(np.uint8)).save(buf, format="PNG")
        image = decode_bytes(buf.getvalue(), max_pixels=10**9)
        decoded.append(image)
        batch.append(predictor.preprocess(image))
    scored = predictor.score(np.stack(batch)) if batch else []
    rows = [predictor.log_row(img, s, source=SIMULATION) for img, s in zip(decoded, scored, strict=True)]
    logger.info("simulated %d production requests (shift %.2f)", n, shift)
    return rows_frame(rows)
