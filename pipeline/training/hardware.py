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
        _patch_keras_multi_worker_reduce()
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


# --------------------------------------------------------------------------- Keras 3 + multi-worker
#
# Keras 3.15's TF trainer does not run `fit` under MultiWorkerMirroredStrategy as shipped
# (keras-team/keras#20585, open): (1) before the first epoch `_maybe_symbolic_build` calls
# `strategy.reduce("MEAN", <input batch>)`, which fails on PerReplica inputs; (2) every step's
# logs go through `reduce_per_replica(..., "mean")`, which calls `strategy.reduce("MEAN", v,
# axis=0)` on scalar metrics ("Invalid reduction dimension 0 for input with 0 dimensions").
# The two helpers below are the smallest fixes, applied only in multi-worker processes: build
# the model from one local batch, and average scalar logs across replicas (axis=None) so that
# every worker sees the same metrics and its callbacks take the same decisions.


def _patch_keras_multi_worker_reduce() -> None:
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_xrayops_patched", False):
        return

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica._xrayops_patched = True  # type: ignore[attr-defined]
    tf_trainer.reduce_per_replica = reduce_per_replica


def prepare_for_fit(model: Any, hw: Hardware, dataset: Any) -> None:
    """Build a compiled model from one local batch so ``fit`` works under MultiWorkerMirroredStrategy.

    A no-op for every other strategy (Keras builds lazily there).
    """
    if hw.kind != "multi-worker":
        return
    batch = next(iter(dataset))
    with hw.strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda *args, **kwargs: None
