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


# --------------------------------------------------------------------------- registry versions for serving tests

_PROMOTION_TAGS = ("gate_", "approval_", "champion_", "previous_champion", "restored_by", "rolled_back_")


def gated_copy(settings: Any, of: Any, *, passed: bool = True, compared_with: str | None = "champion") -> Any:
    """A new registry version of ``of``'s model (same run and source, its lineage tags only), gated by the real
    recorder (:func:`pipeline.registry.write.record_decision`) against ``compared_with``: ``"champion"`` = the
    version holding ``champion`` now, else a version number or None (absolute floors only)."""
    from pipeline.registry.contract import CHAMPION
    from pipeline.registry.decision import Criterion, GateDecision
    from pipeline.registry.read import get_alias
    from pipeline.registry.write import record_decision
    from pipeline.tracking import configure_mlflow

    client = configure_mlflow(settings)
    name = settings.registered_model
    lineage = {k: v for k, v in of.tags.items() if not k.startswith(_PROMOTION_TAGS)}
    mv = client.create_model_version(name, source=of.source, run_id=of.run_id, tags=lineage)
    if compared_with == "champion":
        champion = get_alias(settings, CHAMPION)
        compared_with = str(champion.version) if champion is not None else None
    decision = GateDecision(name, str(mv.version), compared_with, [Criterion("auc_floor", 0.9, ">= 0.5", passed)],
                            passed, "all criteria passed" if passed else "failed: auc_floor")
    record_decision(settings, mv, decision, of.run_id)
    return client.get_model_version(name, mv.version)


def restore_champion(settings: Any, version: str, attempts: int = 6) -> None:
    """Roll ``champion`` back (the audited way) until ``version`` holds it again."""
    from pipeline.registry.contract import CHAMPION
    from pipeline.registry.read import get_alias
    from pipeline.registry.write import rollback

    for _ in range(attempts):
        current = get_alias(settings, CHAMPION)
        if current is not None and str(current.version) == str(version):
            return
        rollback(settings, reason="test clean-up", actor="tests")
    raise AssertionError(f"could not roll champion back to v{version}")
