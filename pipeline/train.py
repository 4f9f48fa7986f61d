"""Stage ``train``: build a zoo model, fit it on the patient-level split, record everything in MLflow.

Outputs (DVC stage outs) under ``<models_dir>/<dataset>/``: ``model.keras`` and
``train.json`` (run id, model URI, input spec, history). A killed run resumes from its
last finished epoch (``BackupAndRestore`` + the same MLflow run) when re-run with the
same data and configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.data.manifest import read_manifest, read_summary
from pipeline.data.versioning import DatasetVersion
from pipeline.inputs import InputSpec, check_files, make_dataset, split_frame
from pipeline.split import read_split, verify_certificate
from pipeline.tracking import code_version, ensure_experiment, pip_requirements

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


def compile_model(model: Any, settings: Settings, num_classes: int, learning_rate: float | None = None) -> None:
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
                  jit_compile=bool(settings.train.xla))


def monitor_metric(num_classes: int) -> str:
    return "val_auc" if num_classes == 2 else "val_accuracy"


def run_fingerprint(settings: Settings, dataset: dict[str, Any]) -> str:
    """Identity of a training run for resuming: same data + train config + seed → same id."""
    payload = json.dumps({"train": settings.train.model_dump(mode="json"), "seed": settings.base.seed,
                          "data": dataset}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _callbacks(settings: Settings, ckpt_dir: Path, num_classes: int, client: Any, run_id: str) -> list[Any]:
    import keras

    from pipeline.tracking_callbacks import MlflowEpochLogger

    monitor = monitor_metric(num_classes)
    cfg = settings.train
    return [
        keras.callbacks.BackupAndRestore(str(ckpt_dir / "backup"), delete_checkpoint=True),
        keras.callbacks.ModelCheckpoint(str(ckpt_dir / "best.keras"), monitor=monitor, mode="max",
                                        save_best_only=True),
        keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=cfg.early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.5,
                                          patience=cfg.reduce_lr_patience, min_lr=1e-6),
        MlflowEpochLogger(client, run_id),
    ]


def run_train(settings: Settings, dataset_dir: Path | None = None, version: DatasetVersion | None = None) -> TrainResult:
    """Train ``train.model`` on the split dataset and log the run to MLflow."""
    import keras
    import mlflow

    from pipeline.hardware import setup_hardware
    from pipeline.models import build_model, get_spec

    dataset_dir = dataset_dir or settings.dataset_dir
    cert = verify_certificate(dataset_dir)
    summary = read_summary(dataset_dir)
    manifest, split = read_manifest(dataset_dir), read_split(dataset_dir)
    classes = list(summary["classes"])
    spec_entry = get_spec(settings.train.model)
    ispec = InputSpec(settings.train.image_size or spec_entry.image_size,
                      settings.train.channels or spec_entry.channels, len(classes))
    train_df, val_df = split_frame(manifest, split, "train"), split_frame(manifest, split, "val")
    dvc = (version.to_dict() if version else summary.get("dvc")) or {}
    dataset = {"name": summary.get("dataset"), "dvc_md5": dvc.get("dvc_md5"), "dvc_rev": dvc.get("rev"),
               "manifest_sha256": summary.get("manifest_sha256"), "split_certificate": cert["certificate_sha256"]}

    keras.utils.set_random_seed(settings.base.seed)
    if settings.train.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    hw = setup_hardware(settings.train.mixed_precision)
    batch = settings.train.batch_size * hw.replicas
    seed = settings.base.seed
    train_ds = make_dataset(check_files(dataset_dir, train_df["path"].tolist()), train_df["label_index"].to_numpy(),
                            ispec, batch_size=batch, training=True, seed=seed, cache=settings.train.cache,
                            augment=settings.train.augment)
    val_ds = make_dataset(check_files(dataset_dir, val_df["path"].tolist()), val_df["label_index"].to_numpy(),
                          ispec, batch_size=batch, training=False, seed=seed, cache=settings.train.cache)
    with hw.strategy.scope():
        model = build_model(settings.train.model, image_size=ispec.image_size, channels=ispec.channels,
                            num_classes=len(classes), weights=settings.train.weights)
        compile_model(model, settings, len(classes))

    fingerprint = run_fingerprint(settings, dataset)
    ckpt_dir = settings.home / "checkpoints" / settings.dataset_name / f"{settings.train.model}-{fingerprint}"
    client, run_id, exp_id = _start_or_resume_run(settings, ckpt_dir, fingerprint)
    started = time.perf_counter()
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        _log_run_inputs(settings, train_df, val_df, dataset, hw.describe(), ispec, classes)
        weights = (class_weights(train_df["label_index"].to_numpy(), len(classes))
                   if settings.train.class_weights else None)
        history = model.fit(train_ds, validation_data=val_ds, epochs=settings.train.epochs, class_weight=weights,
                            callbacks=_callbacks(settings, ckpt_dir, len(classes), client, run_id),
                            verbose=1 if sys.stdout.isatty() else 2)
        hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        hist = _fine_tune(model, settings, train_ds, val_ds, weights, len(classes), ckpt_dir, client, run_id, hist)
        model_uri = _log_model(model, ispec, settings, hist)
    seconds = time.perf_counter() - started
    result = TrainResult(run_id=run_id, experiment_id=exp_id, model_uri=model_uri, model_name=settings.train.model,
                         input=asdict(ispec), classes=classes, positive_class=summary.get("positive_class"),
                         history=hist, epochs_run=len(next(iter(hist.values()), [])), seconds=round(seconds, 2),
                         hardware=hw.describe(), dataset=dataset, model=model)
    _write_outputs(settings, result)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    logger.info("trained %s in %.1f s (%d epochs); MLflow run %s", settings.train.model, seconds,
                result.epochs_run, run_id)
    return result


def _start_or_resume_run(settings: Settings, ckpt_dir: Path, fingerprint: str) -> tuple[Any, str, str]:
    """Reuse the MLflow run of an interrupted identical training, else create one."""
    from pipeline.tracking import configure_mlflow

    client = configure_mlflow(settings)
    exp_id = ensure_experiment(settings)
    marker = ckpt_dir / "run.json"
    if marker.exists() and (ckpt_dir / "backup").exists():
        run_id = json.loads(marker.read_text())["run_id"]
        logger.info("resuming interrupted training (MLflow run %s)", run_id)
        return client, run_id, exp_id
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tags = {**code_version(settings.root), "seed": str(settings.base.seed), "stage": "train",
            "model": settings.train.model, "fingerprint": fingerprint}
    run = client.create_run(exp_id, run_name=f"{settings.train.model}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    marker.write_text(json.dumps({"run_id": run.info.run_id}))
    return client, run.info.run_id, exp_id


def _log_run_inputs(settings: Settings, train_df: pd.DataFrame, val_df: pd.DataFrame, dataset: dict[str, Any],
                    hardware: dict[str, Any], ispec: InputSpec, classes: list[str]) -> None:
    import mlflow

    params = {k: ("" if v is None else v) for k, v in settings.flat_params().items()}
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    mlflow.set_tags({"dataset": dataset["name"], "dvc_md5": str(dataset["dvc_md5"]),
                     "dvc_rev": str(dataset["dvc_rev"]), "split_certificate": dataset["split_certificate"],
                     "hardware": hardware["kind"], "replicas": str(hardware["replicas"]),
                     "mixed_precision": str(hardware["mixed_precision"]).lower()})
    mlflow.log_params({"input.image_size": ispec.image_size, "input.channels": ispec.channels,
                       "classes": ",".join(classes), "n_train": len(train_df), "n_val": len(val_df)})
    lineage_tags = {k: str(v) for k, v in dataset.items() if v is not None}
    for context, frame in (("training", train_df), ("validation", val_df)):
        ds = mlflow.data.from_pandas(frame[["image_id", "label"]], name=str(dataset["name"]),
                                     digest=str(dataset["dvc_md5"] or dataset["manifest_sha256"])[:32])
        mlflow.log_input(ds, context=context, tags=lineage_tags)


def _fine_tune(model: Any, settings: Settings, train_ds: Any, val_ds: Any, weights: dict[int, float] | None,
               num_classes: int, ckpt_dir: Path, client: Any, run_id: str,
               hist: dict[str, list[float]]) -> dict[str, list[float]]:
    """Phase 2 for transfer models: unfreeze the top layers (BatchNorm stays frozen), lower LR."""
    from pipeline.models.transfer import unfreeze_top

    if settings.train.fine_tune_epochs <= 0 or not unfreeze_top(model, settings.train.fine_tune_layers):
        return hist
    compile_model(model, settings, num_classes, settings.train.fine_tune_learning_rate)
    start = len(next(iter(hist.values()), []))
    more = model.fit(train_ds, validation_data=val_ds, initial_epoch=start,
                     epochs=start + settings.train.fine_tune_epochs, class_weight=weights,
                     callbacks=_callbacks(settings, ckpt_dir / "phase2", num_classes, client, run_id),
                     verbose=1 if sys.stdout.isatty() else 2)
    for k, vals in more.history.items():
        hist.setdefault(k, []).extend(float(v) for v in vals)
    return hist


def _log_model(model: Any, ispec: InputSpec, settings: Settings, hist: dict[str, list[float]]) -> str:
    import mlflow
    from mlflow.models import infer_signature

    sample = np.zeros((2, ispec.image_size, ispec.image_size, ispec.channels), np.float32)
    signature = infer_signature(sample, np.asarray(model(sample, training=False)))
    info = mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=pip_requirements())
    mlflow.log_figure(_curves_figure(hist), "plots/training_curves.png")
    _log_architecture(model)
    return str(info.model_uri)


def _log_architecture(model: Any) -> None:
    """Log the architecture report when the zoo provides one (``pipeline.models.architecture``)."""
    import mlflow

    try:
        from pipeline.models.architecture import architecture_report
    except ImportError:
        mlflow.log_text(_summary_text(model), "architecture/summary.txt")
        return
    report = architecture_report(model)
    mlflow.log_dict(report.to_dict(), "architecture/report.json")
    mlflow.log_text(report.to_text(), "architecture/report.txt")


def _summary_text(model: Any) -> str:
    lines: list[str] = []
    model.summary(print_fn=lines.append)
    return "\n".join(lines)


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
    out = settings.model_dir
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILE}.tmp.keras"
    result.model.save(tmp)
    tmp.replace(out / MODEL_FILE)
    (out / TRAIN_FILE).write_text(json.dumps(result.to_json(), indent=2, sort_keys=True))


def load_trained(settings: Settings) -> TrainResult:
    """Reload the last training output of this dataset (for the separate DVC ``evaluate`` stage)."""
    import keras

    from pipeline.models.registry import register_custom_objects

    register_custom_objects()
    out = settings.model_dir
    path = out / TRAIN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `xrayops train` first")
    data = json.loads(path.read_text())
    return TrainResult(**data, model=keras.models.load_model(out / MODEL_FILE, compile=False))
