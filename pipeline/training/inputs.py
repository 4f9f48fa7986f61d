"""tf.data input pipelines: decode (PNG/JPEG, 8/16-bit) → resize → cache → shuffle → batch → augment →
prefetch.

Images come out as float32 in [0, 1] with the model's channel count; models do their
own normalisation (transfer backbones apply their preprocessing inside the model).

- decoding runs in parallel and happens once: resized images are cached in memory, so
  later epochs only shuffle, batch and augment;
- ``cache()`` comes before ``shuffle()`` so each epoch sees a new order;
- augmentation is one Keras preprocessing layer (:class:`~pipeline.training.models.augment.RandomAffineAugment`)
  applied to whole batches, one resampling per batch; its randomness comes from a per-batch
  seed stream (``tf.data.Dataset.random``), so parallel maps stay reproducible;
- the same finishing steps serve image files and in-memory arrays (:func:`make_array_dataset`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import AugmentSection
from pipeline.errors import InputError
from pipeline.training.preprocess import decode_file, to_model_input

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIRECTORY_LAYOUT = "ROOT/<class>/<image>.png|jpg|jpeg — one sub-folder per class (e.g. ROOT/NORMAL, ROOT/PNEUMONIA)"
SHUFFLE_BUFFER_BYTES = 256 * 2**20  # the shuffle buffer holds decoded images: cap its memory


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


def directory_files(root: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """``(paths, label indices, class names)`` of a ``ROOT/<class>/<image>`` tree (``flow_from_directory`` layout).

    Raises:
        InputError: the folder does not exist or holds no class sub-folders with images — the
            seed's Q9 crashed here with a bare ``FileNotFoundError: 'dataset/train'``.
    """
    folder = Path(root).expanduser()
    where = f"{folder} (resolved to {folder.resolve()})" if not folder.is_absolute() else str(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {where} does not exist. Expected layout: {DIRECTORY_LAYOUT}. "
                         "Point data.input (or --input) at such a folder.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(f for f in (folder / name).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(f) for f in files]
        labels += [index] * len(files)
    if not paths:
        raise InputError(f"image folder {where} holds no images in class sub-folders "
                         f"(found sub-folders: {classes or 'none'}). Expected layout: {DIRECTORY_LAYOUT}.")
    return paths, np.asarray(labels, np.int64), classes


def decode_resize(path: Any, spec: InputSpec) -> Any:
    """Read one PNG (8/16-bit) or JPEG file into a float32 ``(size, size, channels)`` tensor in [0, 1]
    (the steps serving shares: :mod:`pipeline.training.preprocess`)."""
    import tensorflow as tf

    img = to_model_input(decode_file(tf.io.read_file(path), spec.channels), spec.image_size, spec.channels)
    return tf.ensure_shape(img, (spec.image_size, spec.image_size, spec.channels))


def augmentation_layer(cfg: AugmentSection, seed: int) -> Any:
    """The training-time augmentation layer for ``cfg`` (None when every setting is off)."""
    from pipeline.training.models.augment import RandomAffineAugment

    layer = RandomAffineAugment(rotation_deg=cfg.rotation_deg, translate=cfg.translate, zoom=cfg.zoom,
                                shear_deg=cfg.shear_deg, horizontal_flip=cfg.horizontal_flip,
                                contrast=cfg.contrast, brightness=cfg.brightness, fill_mode=cfg.fill_mode,
                                seed=seed, name="augment")
    return layer if (layer.geometric or layer.contrast or layer.brightness) else None


def parallel_calls() -> int:
    """Parallelism of decode and augmentation maps (fixed: see :func:`dataset_options`)."""
    return max(2, os.cpu_count() or 2)


def dataset_options() -> Any:
    """Deterministic order, explicit data sharding across workers, no autotuner.

    Measured both ways (``benchmarks/bench_input.py``, ``benchmarks/bench_train.py``, 2 CPUs):
    the multi-second stalls STACK.md reports for the autotuner did not reproduce, but with it on
    throughput was 2–9 % lower in both benchmarks, so fixed parallelism stays.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _label_dtype(spec: InputSpec) -> Any:
    import tensorflow as tf

    return tf.float32 if spec.num_classes == 2 else tf.int32


def _finish(ds: Any, n: int, spec: InputSpec, *, batch_size: int, training: bool, seed: int, cache: bool,
            augment: AugmentSection | None, drop_remainder: bool = False) -> Any:
    """cache → shuffle → batch → augment (per-batch seeds) → prefetch."""
    import tensorflow as tf

    if cache:
        ds = ds.cache()
    if training:
        per_image = spec.image_size * spec.image_size * spec.channels * 4
        buffer = max(1, min(n, max(1024, SHUFFLE_BUFFER_BYTES // per_image)))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    aug = augmentation_layer(augment, seed) if (training and augment) else None
    if aug is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (aug(xy[0], training=True, seed=s), xy[1]), num_parallel_calls=parallel_calls())
    return ds.prefetch(2).with_options(dataset_options())


def make_dataset(paths: list[str], labels: np.ndarray, spec: InputSpec, *, batch_size: int, training: bool,
                 seed: int, cache: bool = True, augment: AugmentSection | None = None,
                 drop_remainder: bool = False) -> Any:
    """A batched ``tf.data.Dataset`` of ``(image, label)`` read from image files.

    ``drop_remainder`` keeps every batch full (multi-worker training: a worker handed an empty
    share of a last partial batch fails in the convolution kernels).
    """
    import tensorflow as tf

    dtype = _label_dtype(spec)
    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels).astype(dtype.as_numpy_dtype)))
    ds = ds.map(lambda p, y: (decode_resize(p, spec), y), num_parallel_calls=parallel_calls())
    return _finish(ds, len(paths), spec, batch_size=batch_size, training=training, seed=seed, cache=cache,
                   augment=augment, drop_remainder=drop_remainder)


def make_array_dataset(images: np.ndarray, labels: np.ndarray, spec: InputSpec, *, batch_size: int,
                       training: bool, seed: int, augment: AugmentSection | None = None) -> Any:
    """The same pipeline for in-memory arrays ``(n, size, size, channels)`` already in [0, 1]."""
    import tensorflow as tf

    dtype = _label_dtype(spec)
    ds = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels.astype(dtype.as_numpy_dtype)))
    return _finish(ds, len(images), spec, batch_size=batch_size, training=training, seed=seed, cache=False,
                   augment=augment)


def directory_dataset(root: str | os.PathLike[str], spec: InputSpec, *, batch_size: int, training: bool,
                      seed: int, cache: bool = True, augment: AugmentSection | None = None) -> tuple[Any, list[str]]:
    """``(dataset, class names)`` of a ``ROOT/<class>/<image>`` folder (our ``flow_from_directory``)."""
    paths, labels, classes = directory_files(root)
    if spec.num_classes != len(classes):
        spec = InputSpec(spec.image_size, spec.channels, len(classes))
    ds = make_dataset(paths, labels, spec, batch_size=batch_size, training=training, seed=seed, cache=cache,
                      augment=augment)
    return ds, classes


def load_images(paths: list[str], spec: InputSpec, batch_size: int = 64) -> np.ndarray:
    """Decode ``paths`` into one float32 array (for evaluation, explanations and features)."""
    ds = make_dataset(paths, np.zeros(len(paths)), spec, batch_size=batch_size, training=False, seed=0, cache=False)
    return np.concatenate([x.numpy() for x, _ in ds], axis=0) if paths else np.zeros((0,) * 4, np.float32)
