"""Keras callback that logs each epoch's metrics to an MLflow run in one batched call."""

from __future__ import annotations

import time
from typing import Any

import keras


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics (and the learning rate) → MLflow, with ``step`` = epoch number."""

    def __init__(self, client: Any, run_id: str) -> None:
        super().__init__()
        self.client = client
        self.run_id = run_id

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in (logs or {}).items()}
        try:
            values["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            pass
        metrics = [Metric(key=k, value=v, timestamp=now, step=epoch) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
