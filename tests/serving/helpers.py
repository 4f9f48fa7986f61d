"""Image and server helpers of the serving and monitoring tests."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.synthetic import CohortSpec, Patient, render_image


def xray01(index: int, *, side: int = 64, shift: float = 0.0, seed: int = 777, positive: bool = False) -> np.ndarray:
    """A synthetic radiograph of a *new* patient (not in any training cohort) in [0, 1]."""
    spec = CohortSpec(n_patients=1, images_per_patient=(1, 1), prevalence=0.5, image_size=side, bit_depth=8,
                      bad_files=0, shift=shift, seed=seed)
    return render_image(Patient(f"P{index}", "PNEUMONIA" if positive else "NORMAL", "F", 50, "PA", 1, index), 0, spec)


def encode(pixels: np.ndarray, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    arr = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8) if pixels.dtype.kind == "f" else pixels
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png(index: int = 0, **kwargs: Any) -> bytes:
    return encode(xray01(index, **kwargs))


def colour_png(side: int = 96) -> bytes:
    rng = np.random.default_rng(0)
    return encode(rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app: Any, timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
