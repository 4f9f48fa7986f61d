"""Keras callbacks of the training stage: per-epoch MLflow logging and resumable callback state."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import keras


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics (and the learning rate) → MLflow, with ``step`` = epoch number, in one batched call."""

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


# Attributes of the stock callbacks that decide what happens next (patience, best value, cooldown).
_STATE = {
    "EarlyStopping": ("wait", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}


class ResumableState(keras.callbacks.Callback):
    """Save and restore the state of EarlyStopping / ReduceLROnPlateau / ModelCheckpoint with ``BackupAndRestore``.

    ``BackupAndRestore`` restores weights, optimizer and epoch, but the other callbacks would
    restart with no memory: patience counters at 0, "best" forgotten (so the first resumed
    epoch always counts as an improvement) and EarlyStopping unable to restore best weights
    seen before the interruption. This callback writes their state next to the backup at
    every epoch end and puts it back at train begin; when the best epoch predates the
    interruption, the best weights come from ModelCheckpoint's file.

    Place it after ``BackupAndRestore`` and the callbacks it manages.
    """

    def __init__(self, path: Path, managed: list[Any], best_weights: Path) -> None:
        super().__init__()
        self.path, self.managed, self.best_weights = Path(path), managed, Path(best_weights)
        self.resumed_from = 0

    def _by_name(self) -> dict[str, Any]:
        return {type(cb).__name__: cb for cb in self.managed if type(cb).__name__ in _STATE}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.resumed_from = int(getattr(self.model, "_initial_epoch", 0) or 0)
        if not self.path.exists() or self.resumed_from == 0:
            return
        state = json.loads(self.path.read_text())
        for name, cb in self._by_name().items():
            for attr, value in state.get(name, {}).items():
                setattr(cb, attr, value)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        state = {name: {a: _plain(getattr(cb, a, None)) for a in _STATE[name]} for name, cb in self._by_name().items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.path)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        stopper = self._by_name().get("EarlyStopping")
        if stopper is None or not getattr(stopper, "restore_best_weights", False):
            return
        best_epoch = getattr(stopper, "best_epoch", 0) or 0
        if stopper.best_weights is None and best_epoch < self.resumed_from and self.best_weights.exists():
            self.model.load_weights(str(self.best_weights))


def _plain(value: Any) -> Any:
    try:
        return float(value) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        return None


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (used by benchmarks and the run record)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)
