"""Hardware detection and distribution strategy (CPU, one GPU, several GPUs, several machines).

- ``TF_CONFIG`` set → ``MultiWorkerMirroredStrategy`` (one process per machine/pod);
- several GPUs → ``MirroredStrategy``; one GPU or CPU → the default strategy;
- ``mixed_float16`` on GPUs when ``train.mixed_precision`` is ``auto`` (models keep a
  float32 output layer), GPU memory growth on, XLA only when asked.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    strategy: Any
    kind: str  # cpu | gpu | multi-gpu | multi-worker
    replicas: int
    gpus: int
    mixed_precision: bool
    worker: str = "chief"  # "chief", or "worker-<i>" for the other workers of a multi-worker cluster

    @property
    def is_chief(self) -> bool:
        """The worker that logs to MLflow and writes outputs (every single-process run is its own chief)."""
        return self.worker == "chief"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "replicas": self.replicas, "gpus": self.gpus,
                "mixed_precision": self.mixed_precision, "worker": self.worker}


def worker_role(tf_config: str | None = None) -> str:
    """``chief`` or ``worker-<i>`` from ``TF_CONFIG`` (worker 0 is the chief when the cluster names none)."""
    raw = tf_config if tf_config is not None else os.environ.get("TF_CONFIG", "")
    if not raw:
        return "chief"
    config = json.loads(raw)
    task, cluster = config.get("task", {}), config.get("cluster", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster):
        return "chief"
    return f"{kind}-{index}"


def setup_hardware(mixed_precision: str = "auto") -> Hardware:
    """Pick the strategy for this process and set the global precision policy."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        strategy: Any = tf.distribute.MultiWorkerMirroredStrategy()
        kind = "multi-worker"
        logger.info("multi-worker training: %s", {k: len(v) for k, v in cluster.items()})
    elif len(gpus) > 1:
        strategy, kind = tf.distribute.MirroredStrategy(), "multi-gpu"
    else:
        strategy, kind = tf.distribute.get_strategy(), ("gpu" if gpus else "cpu")
    use_mp = mixed_precision == "on" or (mixed_precision == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mp else "float32")
    hw = Hardware(strategy, kind, int(strategy.num_replicas_in_sync), len(gpus), use_mp, worker_role())
    logger.info("hardware: %s", hw.describe())
    return hw
