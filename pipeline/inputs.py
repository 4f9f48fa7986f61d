"""tf.data input pipelines: decode (PNG/JPEG, 8/16-bit) → resize → cache → shuffle → batch → augment → prefetch.

Images come out as float32 in [0, 1] with the model's channel count; models do their
own normalisation (transfer backbones apply their preprocessing inside the model).
``cache()`` comes before ``shuffle()`` so each epoch sees a new order, and augmentation
runs on batches (one vectorised pass per layer) after the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import AugmentSection


class InputError(FileNotFoundError):
    """Image files are missing; the message names the path and the expected layout."""


@dataclass(frozen=True)
class InputSpec:
    image_size: int
    channels: int
    num_classes: int


def split_frame(manifest: pd.DataFrame, split: pd.DataFrame, name: str) -> pd.DataFrame:
    """Manifest rows of split ``name`` in a stable order."""
    ids = split.loc[split["split"] == name, "image_id"]
    return manifest.set_index("image_id").loc[sorted(ids)].reset_index()


def check_files(dataset_dir: Path, rel_paths: list[str]) -> list[str]:
    """Absolute paths of ``rel_paths``; raises :class:`InputError` naming what is missing."""
    if not dataset_dir.is_dir():
        raise InputError(
            f"dataset folder {dataset_dir} does not exist. Expected the output of `xrayops ingest`: "
            f"{dataset_dir}/manifest.parquet and {dataset_dir}/images/<id>.png. Run `xrayops ingest` first."
        )
    paths = [str(dataset_dir / p) for p in rel_paths]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(paths)} image files listed in {dataset_dir}/manifest.parquet are missing "
            f"(first: {missing[0]}). Re-run `xrayops ingest` to rebuild the image store."
        )
    return paths


def decode_resize(path: Any, spec: InputSpec) -> Any:
    """Read one file into a float32 ``(size, size, channels)`` tensor in [0, 1]."""
    import tensorflow as tf

    raw = tf.io.read_file(path)
    img = tf.image.decode_image(raw, channels=spec.channels, dtype=tf.float32, expand_animations=False)
    img = tf.image.resize(img, (spec.image_size, spec.image_size), antialias=True)
    return tf.ensure_shape(tf.clip_by_value(img, 0.0, 1.0), (spec.image_size, spec.image_size, spec.channels))


def augmentation_layers(cfg: AugmentSection, seed: int) -> Any:
    """Keras preprocessing layers for training-time augmentation (no horizontal flip unless enabled)."""
    import keras
    from keras import layers

    steps: list[Any] = []
    if cfg.rotation_deg:
        steps.append(layers.RandomRotation(cfg.rotation_deg / 360.0, fill_mode="constant", seed=seed))
    if cfg.translate:
        steps.append(layers.RandomTranslation(cfg.translate, cfg.translate, fill_mode="constant", seed=seed + 1))
    if cfg.zoom:
        steps.append(layers.RandomZoom(cfg.zoom, fill_mode="constant", seed=seed + 2))
    if cfg.contrast:
        steps.append(layers.RandomContrast(cfg.contrast, seed=seed + 3))
    if cfg.brightness:
        steps.append(layers.RandomBrightness(cfg.brightness, value_range=(0.0, 1.0), seed=seed + 4))
    if cfg.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed + 5))
    return keras.Sequential(steps, name="augment") if steps else None


def _options() -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    # TF 2.21's autotuner stalls for seconds when an epoch's iterator is created or
    # discarded (see benchmarks/bench_input.py); fixed parallelism avoids it.
    options.autotune.enabled = False
    return options


def make_dataset(paths: list[str], labels: np.ndarray, spec: InputSpec, *, batch_size: int, training: bool,
                 seed: int, cache: bool = True, augment: AugmentSection | None = None) -> Any:
    """A batched ``tf.data.Dataset`` of ``(image, label)``."""
    import tensorflow as tf

    parallel = max(2, os.cpu_count() or 2)
    label_dtype = tf.float32 if spec.num_classes == 2 else tf.int32
    ds = tf.data.Dataset.from_tensor_slices((paths, labels.astype(np.float32 if spec.num_classes == 2 else np.int32)))
    ds = ds.map(lambda p, y: (decode_resize(p, spec), tf.cast(y, label_dtype)), num_parallel_calls=parallel)
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(len(paths), 4096), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    aug = augmentation_layers(augment, seed) if (training and augment) else None
    if aug is not None:
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=parallel)
    return ds.prefetch(2).with_options(_options())


def load_images(paths: list[str], spec: InputSpec, batch_size: int = 64) -> np.ndarray:
    """Decode ``paths`` into one float32 array (for evaluation, explanations and features)."""
    ds = make_dataset(paths, np.zeros(len(paths)), spec, batch_size=batch_size, training=False, seed=0, cache=False)
    return np.concatenate([x.numpy() for x, _ in ds], axis=0) if paths else np.zeros((0,) * 4, np.float32)
