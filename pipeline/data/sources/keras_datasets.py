"""``keras:mnist`` and ``keras:cifar10``: the seed notebook's CNN baselines, as image files.

The arrays come from the Keras dataset cache (``$KERAS_HOME/datasets``, default
``~/.keras/datasets``): a cached file is read directly (no TensorFlow import); otherwise it
is downloaded with ``keras.utils.get_file`` from the same origin and with the same checksum
that ``keras.datasets`` uses. Offline, the error names the file to place in the cache.
The images are materialised once as 8-bit PNGs under ``ROOT/<class>/<split>_<index>.png``
(``split`` = the shipped train/test, recorded as ``source_split``), so they version,
validate and train like any other folder dataset; each image is its own "patient".
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.sources.base import RawRecord, SourceNotes, SourceProfile, list_files, require_dir
from pipeline.errors import SourceError

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MARKER = "materialised.done"


@dataclass(frozen=True)
class KerasDataset:
    """Where Keras downloads a dataset from, its checksum and the cache names it may have."""

    name: str
    origin: str
    sha256: str
    download_as: str
    cache_names: tuple[str, ...]
    classes: tuple[str, ...]
    colour: bool


DATASETS = {
    "mnist": KerasDataset(
        "mnist", "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
        "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1", "mnist.npz", ("mnist.npz",),
        tuple(str(d) for d in range(10)), colour=False),
    "cifar10": KerasDataset(
        "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", "cifar-10-python.tar.gz",
        ("cifar-10-python.tar.gz", "cifar-10-batches-py-target_archive", "cifar-10-batches-py-target",
         "cifar-10-batches-py"), CIFAR10_CLASSES, colour=True),
}

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images, labels)


def keras_cache_dir() -> Path:
    """``$KERAS_HOME/datasets`` (Keras' own rule), default ``~/.keras/datasets``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets"


class KerasDatasetSource:
    def __init__(self, dataset: str) -> None:
        self.spec = DATASETS[dataset]
        self.name = f"keras:{dataset}"
        self.profile = SourceProfile(classes=self.spec.classes, positive_class=None, min_size=8, size_range=(8, 64),
                                     allow_colour=self.spec.colour, modality="photo" if self.spec.colour else "digits")
        self.notes = SourceNotes()

    def prepare(self, root: Path) -> None:
        if (root / MARKER).exists():
            return
        arrays = load_arrays(self.spec)
        count = 0
        for split, (images, labels) in arrays.items():
            for i, (img, target) in enumerate(zip(images, labels, strict=True)):
                out = root / self.spec.classes[int(target)] / f"{split}_{i:05d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(img)).save(out, format="PNG")
                count += 1
        (root / MARKER).write_text(f"{count} images\n")
        logger.info("materialised %s: %d PNG files under %s", self.name, count, root)

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        require_dir(root, "ROOT/<class>/<split>_<index>.png", f"Materialise it with `xrayops data generate "
                                                              f"--set data.source={self.name}`.")
        for path in list_files(root, self.notes.ignored):
            if path.parent == root:
                continue  # the marker file
            ref = path.relative_to(root).as_posix()
            split = path.stem.split("_", 1)[0]
            yield RawRecord(path=path, ref=ref, label=path.parent.name, patient_key=ref,
                            source_split=split if split in ("train", "test") else None)


def load_arrays(spec: KerasDataset) -> Arrays:
    """The dataset's arrays from the Keras cache, downloading into it when possible.

    Raises:
        SourceError: not cached and the download failed (offline), or the cached file is unreadable.
    """
    cache = keras_cache_dir()
    cached = next((cache / n for n in spec.cache_names if (cache / n).exists()), None)
    if cached is None:
        cached = download(spec, cache)
    try:
        return _read_mnist(cached) if spec.name == "mnist" else _read_cifar10(cached)
    except (OSError, KeyError, ValueError, EOFError, tarfile.TarError, pickle.UnpicklingError) as exc:
        raise SourceError(f"cached keras:{spec.name} file {cached} is unreadable ({type(exc).__name__}: {exc}); "
                          f"delete it and place a fresh copy of {spec.origin} at {cache / spec.download_as}") from None


def download(spec: KerasDataset, cache: Path) -> Path:
    """Download with Keras (checksum-verified) into ``cache``; a clear error when offline."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        from keras.utils import get_file

        return Path(get_file(fname=spec.download_as, origin=spec.origin, file_hash=spec.sha256,
                             cache_dir=str(cache.parent), cache_subdir=cache.name))
    except Exception as exc:  # noqa: BLE001 - keras raises a bare Exception("URL fetch failure ...") offline
        raise SourceError(
            f"keras:{spec.name} is not in the Keras cache and could not be downloaded ({str(exc)[:160]}). "
            f"Offline? Download {spec.origin} elsewhere and place it at {cache / spec.download_as} "
            f"(the Keras cache, $KERAS_HOME/datasets; default ~/.keras/datasets/{spec.download_as})."
        ) from None


def _read_mnist(path: Path) -> Arrays:
    with np.load(path, allow_pickle=False) as f:
        return {"train": (f["x_train"], f["y_train"]), "test": (f["x_test"], f["y_test"])}


def _read_cifar10(path: Path) -> Arrays:
    """CIFAR-10 batches from the tarball or from an extracted ``cifar-10-batches-py`` folder."""
    batches: dict[str, bytes] = {}
    if path.is_dir():
        for f in path.rglob("*_batch*"):
            batches[f.name] = f.read_bytes()
    else:
        with tarfile.open(path, "r:*") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and (name.startswith("data_batch_") or name == "test_batch"):
                    batches[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    train = [_cifar_batch(batches[f"data_batch_{i}"]) for i in range(1, 6) if f"data_batch_{i}" in batches]
    if not train or "test_batch" not in batches:
        raise KeyError("data_batch_1..5 / test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return {"train": (x_train, y_train), "test": _cifar_batch(batches["test_batch"])}


def _cifar_batch(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return data, np.asarray(d["labels"], dtype=np.int64)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches without executing arbitrary code: numpy array rebuilding only
    (the same globals Keras' own restricted unpickler allows)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)
