"""Stage ``train``: build a zoo model, fit it on the patient-level split, record everything in MLflow.

Outputs (DVC stage outs) under ``<models_dir>/<dataset>/``: ``model.keras`` and
``train.json`` (run id, model URI, input spec, history). A killed run resumes from its
last finished epoch (``BackupAndRestore`` + the same MLflow run) when re-run with the
same data and configuration. A live run holds its checkpoint folder locked
(:mod:`pipeline.training.checkpoints`): an identical run started meanwhile trains in a
folder and MLflow run of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.data.manifest import read_manifest, read_summary
from pipeline.data.split import read_split, verify_certificate
from pipeline.data.versioning import DatasetVersion
from pipeline.locking import file_lock
from pipeline.registry.contract import (
    ARCHITECTURE_REPORT_ARTIFACT,
    ARCHITECTURE_TEXT_ARTIFACT,
    FEATURE_MAPS_ARTIFACT,
    FILTERS_ARTIFACT,
    TRAINING_CURVES_ARTIFACT,
    UNVERSIONED,
)
from pipeline.tracking import code_version, ensure_experiment, loggable_params, mask_secrets, pip_requirements
from pipeline.training.checkpoints import OWNER_FILE, claim_checkpoint_dir
from pipeline.training.inputs import InputSpec, check_files, make_dataset, split_frame

logger = logging.getLogger(__name__)

TRAIN_FILE = "train.json"
MODEL_FILE = "model.keras"


@dataclass
class TrainResult:
    """What training produced; ``model`` is the in-memory Keras model (not serialised)."""

    run_id: str
    experiment_id: str
    model_uri: str
    model_name: str
    input: dict[str, int]
    classes: list[str]
    positive_class: str | None
    history: dict[str, list[float]]
    epochs_run: int
    seconds: float
    hardware: dict[str, Any]
    dataset: dict[str, Any]
    model: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("model")
        return d


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights ``n / (k * n_c)`` from the training labels."""
    counts = np.bincount(labels.astype(int), minlength=num_classes).astype(float)
    counts[counts == 0] = 1.0
    return {i: float(len(labels) / (num_classes * c)) for i, c in enumerate(counts)}


# Training steps run per call into the compiled graph: fewer Python round-trips per epoch
# (benchmarks/bench_train.py); per-batch callbacks then fire every N steps. Multi-worker training
# runs one step per call: Keras 3.15's multi-step loop fails under MultiWorkerMirroredStrategy.
STEPS_PER_EXECUTION = 8


def compile_model(model: Any, settings: Settings, num_classes: int, learning_rate: float | None = None,
                  steps_per_execution: int = STEPS_PER_EXECUTION) -> None:
    """Compile with the configured loss and stable metric names (``auc``, ``pr_auc``, ``precision``, ``recall``)."""
    import keras

    lr = learning_rate or settings.train.learning_rate
    if num_classes == 2:
        loss: Any = (keras.losses.BinaryFocalCrossentropy(gamma=2.0) if settings.train.loss == "focal"
                     else keras.losses.BinaryCrossentropy())
        metrics: list[Any] = [
            keras.metrics.AUC(name="auc"),
            keras.metrics.AUC(curve="PR", name="pr_auc"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
        ]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=metrics,
                  jit_compile=bool(settings.train.xla), steps_per_execution=steps_per_execution)


def _steps_per_execution(hw: Any) -> int:
    return 1 if hw.kind == "multi-worker" else STEPS_PER_EXECUTION


def monitor_metric(num_classes: int) -> str:
    return "val_auc" if num_classes == 2 else "val_accuracy"


def run_fingerprint(settings: Settings, dataset: dict[str, Any]) -> str:
    """Identity of a training run for resuming: same data + train config + seed → same id."""
    payload = json.dumps({"train": settings.train.model_dump(mode="json"), "seed": settings.base.seed,
                          "data": dataset}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


BEST_WEIGHTS = "best.weights.h5"


def _callbacks(settings: Settings, ckpt_dir: Path, num_classes: int, tracker: Any,
               extra: list[Any] | None = None) -> list[Any]:
    """Backup/restore, best checkpoint, early stopping, LR schedule, resumable state, per-epoch MLflow."""
    import keras

    from pipeline.training.callbacks import MlflowEpochLogger, ResumableState

    monitor = monitor_metric(num_classes)
    cfg = settings.train
    managed = [
        keras.callbacks.ModelCheckpoint(str(ckpt_dir / BEST_WEIGHTS), monitor=monitor, mode="max",
                                        save_best_only=True, save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=cfg.early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.5,
                                          patience=cfg.reduce_lr_patience, min_lr=1e-6),
    ]
    # MLflow logs an epoch before it is backed up: a kill in between re-runs (and re-logs) that epoch
    # rather than leaving a gap in the metric history.
    logger_cb = [MlflowEpochLogger(tracker.client, tracker.run_id)] if tracker is not None else []
    return [*logger_cb,
            keras.callbacks.BackupAndRestore(str(ckpt_dir / "backup"), double_checkpoint=True, delete_checkpoint=True),
            *managed, ResumableState(ckpt_dir / "backup" / "callbacks.json", managed, ckpt_dir / BEST_WEIGHTS),
            *(extra or [])]


@dataclass
class _Tracker:
    """The MLflow run of this training (chief only); ``resumed`` when an interrupted run is continued."""

    client: Any
    run_id: str
    experiment_id: str
    resumed: bool


def _prepare(settings: Settings, dataset_dir: Path, version: DatasetVersion | None) -> dict[str, Any]:
    """Read and check the split dataset: frames, classes and the lineage record."""
    cert = verify_certificate(dataset_dir)
    summary = read_summary(dataset_dir)
    manifest, split = read_manifest(dataset_dir), read_split(dataset_dir)
    dvc = (version.to_dict() if version else summary.get("dvc")) or {}
    dataset = {"name": summary.get("dataset"), "dvc_md5": dvc.get("dvc_md5"), "dvc_rev": dvc.get("rev"),
               "manifest_sha256": summary.get("manifest_sha256"), "split_certificate": cert["certificate_sha256"]}
    return {"classes": list(summary["classes"]), "positive_class": summary.get("positive_class"),
            "train": split_frame(manifest, split, "train"), "val": split_frame(manifest, split, "val"),
            "dataset": dataset}


def _datasets(settings: Settings, dataset_dir: Path, data: dict[str, Any], ispec: InputSpec,
              hw: Any) -> tuple[Any, Any]:
    """Training and validation pipelines at the global batch size (per-replica batch × replicas)."""
    seed, cfg = settings.base.seed, settings.train
    common = {"batch_size": cfg.batch_size * hw.replicas, "seed": seed, "cache": cfg.cache,
              "drop_remainder": hw.kind == "multi-worker"}
    train_df, val_df = data["train"], data["val"]
    train_ds = make_dataset(check_files(dataset_dir, train_df["path"].tolist()), train_df["label_index"].to_numpy(),
                            ispec, training=True, augment=cfg.augment, **common)
    val_ds = make_dataset(check_files(dataset_dir, val_df["path"].tolist()), val_df["label_index"].to_numpy(),
                          ispec, training=False, **common)
    return train_ds, val_ds


def run_train(settings: Settings, dataset_dir: Path | None = None, version: DatasetVersion | None = None,
              extra_callbacks: list[Any] | None = None) -> TrainResult:
    """Train ``train.model`` on the split dataset and log the run to MLflow.

    Re-running after an interruption (same data + train config + seed) resumes from the last
    finished epoch into the same MLflow run. In a multi-worker cluster (``TF_CONFIG``) every
    worker trains; only the chief logs to MLflow and writes the outputs.
    """
    import keras

    from pipeline.training.calibrate import calibrate_binary
    from pipeline.training.hardware import prepare_for_fit, setup_hardware
    from pipeline.training.models import build_model, get_spec

    hw = setup_hardware(settings.train.mixed_precision)  # first: multi-worker collectives need a fresh runtime
    dataset_dir = dataset_dir or settings.dataset_dir
    data = _prepare(settings, dataset_dir, version)
    classes, spec_entry = data["classes"], get_spec(settings.train.model)
    ispec = InputSpec(settings.train.image_size or spec_entry.image_size,
                      settings.train.channels or spec_entry.channels, len(classes))
    keras.utils.set_random_seed(settings.base.seed)
    set_op_determinism(settings.train.deterministic)
    train_ds, val_ds = _datasets(settings, dataset_dir, data, ispec, hw)
    with hw.strategy.scope():
        model = build_model(settings.train.model, image_size=ispec.image_size, channels=ispec.channels,
                            num_classes=len(classes), weights=settings.train.weights)
        compile_model(model, settings, len(classes), steps_per_execution=_steps_per_execution(hw))
    prepare_for_fit(model, hw, train_ds)

    fingerprint = run_fingerprint(settings, data["dataset"])
    # workers back up privately (own folders); only the chief's state is the record
    name = f"{settings.train.model}-{fingerprint}" + ("" if hw.is_chief else f"-{hw.worker}")
    # a live identical run holds its folder: this one never adopts it (nor its MLflow run), it takes its own
    with claim_checkpoint_dir(settings.home / "checkpoints" / settings.dataset_name, name) as claimed:
        ckpt_dir = claimed.path
        tracker = _start_or_resume_run(settings, ckpt_dir, fingerprint) if hw.is_chief else None
        started = time.perf_counter()
        with _active_run(tracker):
            if tracker is not None and not tracker.resumed:
                _log_run_inputs(settings, data["train"], data["val"], data["dataset"], hw.describe(), ispec, classes)
            weights = (class_weights(data["train"]["label_index"].to_numpy(), len(classes))
                       if settings.train.class_weights else None)
            hist = _fit_phases(model, _Fit(settings, train_ds, val_ds, weights, len(classes), ckpt_dir, tracker, hw,
                                           extra_callbacks))
            if hw.is_chief and len(classes) == 2:
                _record_calibration(calibrate_binary(model, val_ds, settings.train.calibration), tracker)
            model_uri = _log_model(model, ispec, settings, hist, train_ds) if tracker is not None else ""
        seconds = time.perf_counter() - started
        result = TrainResult(run_id=tracker.run_id if tracker else "", experiment_id=tracker.experiment_id
                             if tracker else "", model_uri=model_uri, model_name=settings.train.model,
                             input=asdict(ispec), classes=classes, positive_class=data["positive_class"],
                             history=hist, epochs_run=len(next(iter(hist.values()), [])), seconds=round(seconds, 2),
                             hardware=hw.describe(), dataset=data["dataset"], model=model)
        if hw.is_chief:
            _write_outputs(settings, result)
    logger.info("trained %s in %.1f s (%d epochs); MLflow run %s", settings.train.model, seconds,
                result.epochs_run, result.run_id or "(worker: not logged)")
    return result


def set_op_determinism(enabled: bool) -> None:
    """Make TensorFlow's process-wide op determinism follow ``train.deterministic`` for this run.

    Enabling it is sticky for the whole process (and disables XLA), so a run that does not ask for
    it switches it off again rather than inheriting it from an earlier run in the same process.
    """
    from tensorflow.python.framework import config as tf_config  # disable_op_determinism has no public alias

    if tf_config.is_op_determinism_enabled() != enabled:
        (tf_config.enable_op_determinism if enabled else tf_config.disable_op_determinism)()


@contextmanager
def _active_run(tracker: _Tracker | None) -> Iterator[None]:
    """The MLflow run as the active run (system metrics on where psutil is installed); nothing for workers."""
    import mlflow

    if tracker is None:
        yield
        return
    with mlflow.start_run(run_id=tracker.run_id, log_system_metrics=_system_metrics_available()):
        yield


def _system_metrics_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def _start_or_resume_run(settings: Settings, ckpt_dir: Path, fingerprint: str) -> _Tracker:
    """Reuse the MLflow run of the interrupted identical training whose folder this run holds
    (``claim_checkpoint_dir``: never a live run's), else create one."""
    from pipeline.tracking import configure_mlflow

    client = configure_mlflow(settings)
    exp_id = ensure_experiment(settings)
    marker = ckpt_dir / "run.json"
    if marker.exists():
        run_id = json.loads(marker.read_text())["run_id"]
        epoch = _backup_epoch(ckpt_dir)
        logger.info("resuming interrupted training at epoch %d (MLflow run %s)", epoch, run_id)
        client.set_tag(run_id, "resumed_from_epoch", str(epoch))
        return _Tracker(client, run_id, exp_id, resumed=True)
    _clear(ckpt_dir)  # files of a run that died before it had an MLflow run: nothing to resume
    tags = {**code_version(settings.root), "seed": str(settings.base.seed), "stage": "train",
            "model": settings.train.model, "fingerprint": fingerprint}
    run = client.create_run(exp_id, run_name=f"{settings.train.model}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    marker.write_text(json.dumps({"run_id": run.info.run_id}))
    return _Tracker(client, run.info.run_id, exp_id, resumed=False)


def _clear(folder: Path) -> None:
    """Remove what ``folder`` holds (the folder itself stays: its lock is held)."""
    for entry in folder.iterdir():
        if entry.name == OWNER_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _backup_epoch(ckpt_dir: Path) -> int:
    """Epochs already finished according to the newest backup (phase 1 + phase 2)."""
    done = ckpt_dir / PHASE1_FILE
    base = json.loads(done.read_text())["epochs"] if done.exists() else 0
    backup = (ckpt_dir / "phase2" if done.exists() else ckpt_dir) / "backup" / "training_metadata.json"
    return json.loads(backup.read_text())["epoch"] if backup.exists() else base


def _log_run_inputs(settings: Settings, train_df: pd.DataFrame, val_df: pd.DataFrame, dataset: dict[str, Any],
                    hardware: dict[str, Any], ispec: InputSpec, classes: list[str]) -> None:
    import mlflow

    mlflow.log_params(loggable_params(settings))  # passwords in URI settings masked
    # lineage states the data version like the registry contract does: UNVERSIONED, never "None"
    tags = {"dataset": dataset["name"], "dvc_md5": dataset["dvc_md5"] or UNVERSIONED,
            "dvc_rev": dataset["dvc_rev"] or UNVERSIONED, "split_certificate": dataset["split_certificate"],
            "hardware": hardware["kind"], "replicas": str(hardware["replicas"]),
            "mixed_precision": str(hardware["mixed_precision"]).lower()}
    mlflow.set_tags(mask_secrets({k: v for k, v in tags.items() if v is not None}))
    mlflow.log_params({"input.image_size": ispec.image_size, "input.channels": ispec.channels,
                       "classes": ",".join(classes), "n_train": len(train_df), "n_val": len(val_df),
                       "global_batch_size": settings.train.batch_size * int(hardware["replicas"])})
    lineage_tags = mask_secrets({k: str(v) for k, v in dataset.items() if v is not None})
    for context, frame in (("training", train_df), ("validation", val_df)):
        # the digest is computed from the split's rows (one dataset entity per split); the DVC hash,
        # revision and split certificate travel as tags
        ds = mlflow.data.from_pandas(frame[["image_id", "label"]], name=str(dataset["name"]))
        _log_input_once(ds, context=context, tags=lineage_tags)


def _log_input_once(ds: Any, *, context: str, tags: dict[str, str], attempts: int = 3) -> None:
    """``mlflow.log_input``, retried when a concurrent run created the same dataset entity first.

    MLflow's SQL store looks the dataset up, then inserts it: two runs logging the same split at
    once make the second insert fail on the UNIQUE constraint (seen with three overlapping
    ``xrayops run``; PostgreSQL words it "duplicate key value"). On retry the dataset exists and
    only the input link is written.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(ds, context=context, tags=tags)
            return
        except MlflowException as exc:
            duplicate = any(s in str(exc) for s in ("UNIQUE constraint failed", "duplicate key value"))
            if not duplicate or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


PHASE1_FILE = "phase1.json"


@dataclass
class _Fit:
    """Everything both training phases need."""

    settings: Settings
    train_ds: Any
    val_ds: Any
    class_weight: dict[int, float] | None
    num_classes: int
    ckpt_dir: Path
    tracker: _Tracker | None
    hw: Any
    extra: list[Any] | None

    def fit(self, model: Any, ckpt_dir: Path, **kwargs: Any) -> Any:
        return model.fit(self.train_ds, validation_data=self.val_ds, class_weight=self.class_weight,
                         callbacks=_callbacks(self.settings, ckpt_dir, self.num_classes, self.tracker, self.extra),
                         verbose=1 if sys.stdout.isatty() else 2,
                         shuffle=False,  # tf.data already shuffles (inputs.py); True only earns Keras a warning
                         **kwargs)


def _fit_phases(model: Any, plan: _Fit) -> dict[str, list[float]]:
    """Phase 1 (all epochs, or the frozen-backbone phase), then phase 2 fine-tuning for transfer models.

    Phase 1's end is recorded (weights + epoch count) so that an interruption during phase 2
    resumes phase 2 instead of starting over.
    """
    cfg, done = plan.settings.train, plan.ckpt_dir / PHASE1_FILE
    local: dict[str, list[float]] = {}
    if done.exists():
        epochs = json.loads(done.read_text())["epochs"]
        model.load_weights(str(plan.ckpt_dir / "phase1.weights.h5"))
    else:
        history = plan.fit(model, plan.ckpt_dir, epochs=cfg.epochs)
        epochs = _epochs_done(history, cfg.epochs)
        _extend(local, history)
        if cfg.fine_tune_epochs > 0:
            model.save_weights(str(plan.ckpt_dir / "phase1.weights.h5"))
            done.write_text(json.dumps({"epochs": epochs}))
    _extend(local, _fine_tune(model, plan, epochs))
    return _full_history(plan.tracker, local)


def _extend(hist: dict[str, list[float]], history: Any) -> None:
    for key, values in (history.history if history is not None else {}).items():
        hist.setdefault(key, []).extend(float(v) for v in values)


def _epochs_done(history: Any, planned: int) -> int:
    """Epochs phase 1 actually ran (early stopping may end it before ``planned``)."""
    return int(history.epoch[-1]) + 1 if history.epoch else planned


def _fine_tune(model: Any, plan: _Fit, start: int) -> Any:
    """Phase 2 for transfer models: unfreeze the top layers (BatchNorm stays frozen), lower LR."""
    from pipeline.training.hardware import prepare_for_fit
    from pipeline.training.models.transfer import unfreeze_top

    cfg = plan.settings.train
    if cfg.fine_tune_epochs <= 0 or not unfreeze_top(model, cfg.fine_tune_layers):
        return None
    with plan.hw.strategy.scope():
        compile_model(model, plan.settings, plan.num_classes, cfg.fine_tune_learning_rate,
                      steps_per_execution=_steps_per_execution(plan.hw))
    prepare_for_fit(model, plan.hw, plan.train_ds)
    return plan.fit(model, plan.ckpt_dir / "phase2", initial_epoch=start, epochs=start + cfg.fine_tune_epochs)


def _full_history(tracker: _Tracker | None, local: dict[str, list[float]]) -> dict[str, list[float]]:
    """Every epoch's metrics, including epochs run before an interruption (read back from MLflow)."""
    if tracker is None:
        return local
    run = tracker.client.get_run(tracker.run_id)
    hist: dict[str, list[float]] = {}
    for key in sorted(run.data.metrics):
        if key.startswith("system/"):
            continue
        points = {m.step: m.value for m in sorted(tracker.client.get_metric_history(tracker.run_id, key),
                                                 key=lambda m: m.timestamp)}
        hist[key] = [float(points[s]) for s in sorted(points)]
    return hist or local


def _record_calibration(calibration: dict[str, Any], tracker: _Tracker | None) -> None:
    """The calibration as a tag (method) and metrics (a resumed run may log them again: params could not)."""
    import mlflow

    if tracker is None:
        return
    mlflow.set_tag("calibration", calibration["method"])
    mlflow.log_metrics({f"calibration_{k}": float(v) for k, v in calibration.items() if k != "method"})


def _log_model(model: Any, ispec: InputSpec, settings: Settings, hist: dict[str, list[float]], train_ds: Any) -> str:
    import mlflow
    from mlflow.models import infer_signature

    sample = np.zeros((2, ispec.image_size, ispec.image_size, ispec.channels), np.float32)
    signature = infer_signature(sample, np.asarray(model(sample, training=False)))
    info = mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=pip_requirements())
    mlflow.log_figure(_curves_figure(hist), TRAINING_CURVES_ARTIFACT)
    _log_architecture(model, _sample_image(train_ds))
    return str(info.model_uri)


def _sample_image(ds: Any) -> np.ndarray | None:
    for images, _ in ds.take(1):
        return np.asarray(images[0])
    return None


def _log_architecture(model: Any, image: np.ndarray | None) -> None:
    """Log the architecture report (table + JSON) and the first-layer filter / feature-map figures."""
    import mlflow

    from pipeline.training.models.architecture import architecture_report
    from pipeline.training.models.visualize import feature_maps_figure, filters_figure

    report = architecture_report(model)
    mlflow.log_dict(report.to_dict(), ARCHITECTURE_REPORT_ARTIFACT)
    mlflow.log_text(report.to_text(), ARCHITECTURE_TEXT_ARTIFACT)
    mlflow.log_metrics({"model_params": float(report.keras_total_params),
                        "model_forward_mflops": report.total_flops / 1e6})
    figures = {FILTERS_ARTIFACT: filters_figure(model),
               FEATURE_MAPS_ARTIFACT: feature_maps_figure(model, image) if image is not None else None}
    for path, fig in figures.items():
        if fig is not None:
            mlflow.log_figure(fig, path)


def _curves_figure(hist: dict[str, list[float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k.removeprefix("val_") for k in hist if k != "learning_rate"})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name in (key, f"val_{key}"):
            if name in hist:
                ax.plot(range(1, len(hist[name]) + 1), hist[name], marker="o", label=name)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _write_outputs(settings: Settings, result: TrainResult) -> None:
    """Write the model and its ``train.json`` as one pair.

    Overlapping runs of one project train into the same folder: each saves to its own
    temporary names (pid + random), then both files are renamed under the folder's lock,
    so a reader never sees one run's model beside another run's summary, and two writers
    never rename the same temporary file.
    """
    out = settings.model_dir
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_model = out / f".{MODEL_FILE}.{tag}.tmp.keras"
    tmp_json = out / f".{TRAIN_FILE}.{tag}.tmp"
    try:
        result.model.save(tmp_model)
        tmp_json.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True))
        with _model_dir_lock(settings):
            tmp_model.replace(out / MODEL_FILE)
            tmp_json.replace(out / TRAIN_FILE)
    finally:
        tmp_model.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)


def load_trained(settings: Settings) -> TrainResult:
    """Reload the last training output of this dataset (for the separate DVC ``evaluate`` stage)."""
    import keras

    from pipeline.training.models.zoo import register_custom_objects

    register_custom_objects()
    out = settings.model_dir
    path = out / TRAIN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `xrayops train` first")
    with _model_dir_lock(settings):  # the pair as one run wrote it (see _write_outputs)
        data = json.loads(path.read_text())
        model = keras.models.load_model(out / MODEL_FILE, compile=False)
    return TrainResult(**data, model=model)


def _model_dir_lock(settings: Settings) -> AbstractContextManager[None]:
    out = settings.model_dir
    return file_lock(out / ".train.lock", what=f"model folder {out}",
                     timeout_s=settings.data.ingest.lock_timeout_s, setting="data.ingest.lock_timeout_s")
