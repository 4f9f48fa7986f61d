"""Training throughput: our training path vs the seed's bare ``model.fit(numpy)`` for the Q6 MNIST CNN.

    flock /tmp/xrayops-heavy.lock uv run python benchmarks/bench_train.py [--images 10000] [--epochs 5] [--rounds 2]

Data: ``--images`` 28×28 digit images (scikit-learn's digits, upscaled with random shifts,
scales and noise; generated once into ``$XRAYOPS_BENCH_CACHE`` or ``~/.cache/xrayops/bench-train``),
ingested and split by the project (70/15/15). Both contenders train the same ``mnist_cnn``
(seed Q6) at batch 128 for ``--epochs`` epochs on the same training split and validate on the
same validation split each epoch:

- seed: the images as one numpy array, ``model.fit(x, y_onehot, batch_size=128,
  validation_data=...)``, nothing else — the seed notebook's Q6 cell;
- ours: ``pipeline.training.train.run_train`` — the tf.data pipeline (PNG decode, cache, shuffle,
  prefetch; no augmentation, as the seed's Q6), class weights, BackupAndRestore,
  ModelCheckpoint, EarlyStopping, ReduceLROnPlateau, resumable state, per-epoch MLflow
  logging, MLflow system metrics — plus, once after training, the model, curves and
  architecture report logged to MLflow;
- ours with tf.data autotune on (AUTOTUNE parallelism, autotuner enabled): tests the claim
  that the autotuner stalls when ``fit`` starts/ends an epoch's iterator.

Throughput = training images / epoch wall time (median of epochs 2..N; epoch 1 includes
graph tracing and, for ours, PNG decoding). Achieved GFLOP/s = training FLOPs per image
(3 × forward, from the architecture report) × images/s, against a float32 matmul peak
measured in the same run. Rounds alternate the contenders; best round per contender.
Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
BATCH = 128


def digits_folder(n: int) -> Path:
    """``n`` 28×28 PNG digits in ``<digit>/`` folders, laid out like the ``sklearn:digits`` source."""
    from PIL import Image
    from scipy.ndimage import affine_transform
    from sklearn.datasets import load_digits

    base = Path(os.environ.get("XRAYOPS_BENCH_CACHE") or Path.home() / ".cache" / "xrayops" / "bench-train")
    root = base / f"digits28-{n}-v1"
    if (root / "digits.done").exists():
        return root
    digits = load_digits()
    rng = np.random.default_rng(0)
    for i in range(n):
        k = i % len(digits.images)
        small = Image.fromarray((digits.images[k] / 16.0).astype(np.float32), mode="F")
        img = np.asarray(small.resize((20, 20), Image.Resampling.BILINEAR))
        canvas = np.zeros((28, 28), np.float32)
        canvas[4:24, 4:24] = img
        scale = rng.uniform(0.85, 1.15)
        matrix = np.eye(2) / scale
        offset = np.array([14, 14]) - matrix @ np.array([14, 14]) + rng.uniform(-2, 2, 2)
        warped = affine_transform(canvas, matrix, offset=offset, order=1)
        warped = np.clip(warped + rng.normal(0, 0.04, warped.shape), 0, 1)
        out = root / str(digits.target[k]) / f"digit_{i:05d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((warped * 255).astype(np.uint8)).save(out)
    (root / "digits.done").write_text(f"{n} images\n")
    return root


def make_project(tmp: Path, folder: Path, epochs: int) -> Any:
    import yaml

    from pipeline.config import apply_overrides, load_settings

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = ["data.source=sklearn:digits", f"data.input={folder}", "data.version_with_dvc=false",
                 "train.model=mnist_cnn", f"train.batch_size={BATCH}", f"train.epochs={epochs}",
                 "train.early_stopping_patience=100", "train.reduce_lr_patience=100",
                 "train.augment.rotation_deg=0", "train.augment.translate=0", "train.augment.zoom=0",
                 "train.augment.contrast=0", "train.augment.brightness=0"]
    (tmp / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, overrides), sort_keys=False))
    return load_settings(tmp / "params.yaml")


def arrays(settings: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.manifest import read_manifest
    from pipeline.data.split import read_split
    from pipeline.training.inputs import InputSpec, check_files, load_images, split_frame

    frame = split_frame(read_manifest(settings.dataset_dir), read_split(settings.dataset_dir), name)
    images = load_images(check_files(settings.dataset_dir, frame["path"].tolist()), InputSpec(28, 1, 10), 512)
    return images, frame["label_index"].to_numpy()


def run_seed(data: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The seed's Q6 cell: bare ``fit`` on numpy arrays."""
    import keras

    from pipeline.training.callbacks import EpochTimer
    from pipeline.training.models import build_model

    keras.backend.clear_session()
    keras.utils.set_random_seed(42)
    model = build_model("mnist_cnn", num_classes=10)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    start = time.perf_counter()
    model.fit(data["x"], keras.utils.to_categorical(data["y"], 10), epochs=epochs, batch_size=BATCH,
              validation_data=(data["xv"], keras.utils.to_categorical(data["yv"], 10)), verbose=0,
              callbacks=[timer])
    return {"epoch_s": timer.seconds, "wall_s": time.perf_counter() - start}


def run_ours(settings: Any, autotune: bool = False) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from pipeline import inputs
    from pipeline.training.callbacks import EpochTimer
    from pipeline.training.train import run_train

    keras.backend.clear_session()
    timer = EpochTimer()
    original = inputs.dataset_options, inputs.parallel_calls
    if autotune:
        def tuned() -> Any:
            options = original[0]()
            options.autotune.enabled = True
            return options

        inputs.dataset_options, inputs.parallel_calls = tuned, lambda: tf.data.AUTOTUNE
    try:
        start = time.perf_counter()
        result = run_train(settings, extra_callbacks=[timer])
        wall = time.perf_counter() - start
    finally:
        inputs.dataset_options, inputs.parallel_calls = original
    return {"epoch_s": timer.seconds, "wall_s": wall, "val_accuracy": result.history["val_accuracy"][-1]}


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Float32 GFLOP/s of a square matmul through TensorFlow (best of 3)."""
    import tensorflow as tf

    a, b = tf.random.uniform((n, n)), tf.random.uniform((n, n))
    step = tf.function(lambda a, b: tf.linalg.matmul(a, b))
    step(a, b).numpy()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            out = step(a, b)
        out.numpy()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from pipeline.runtime import quiet_tools

    quiet_tools()
    os.environ.setdefault("XRAYOPS_PSEUDONYM_SALT", "bench-salt-not-secret-0123456789abcdef")
    folder = digits_folder(args.images)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        settings = make_project(Path(tmp), folder, args.epochs)
        from pipeline.data.ingest import run_ingest
        from pipeline.data.split import run_split

        run_ingest(settings, show_progress=False)
        run_split(settings)
        (x, y), (xv, yv) = arrays(settings, "train"), arrays(settings, "val")
        data = {"x": x, "y": y, "xv": xv, "yv": yv}
        runs: dict[str, list[dict[str, Any]]] = {"seed model.fit(numpy)": [], "ours run_train": [],
                                                 "ours run_train, autotune on": []}
        peak = matmul_peak()
        for _ in range(args.rounds):
            runs["seed model.fit(numpy)"].append(run_seed(data, args.epochs))
            runs["ours run_train"].append(run_ours(settings))
            runs["ours run_train, autotune on"].append(run_ours(settings, autotune=True))
        peak = max(peak, matmul_peak())
        report(runs, len(x), len(xv), peak, args)


def report(runs: dict[str, list[dict[str, Any]]], n_train: int, n_val: int, peak: float,
           args: argparse.Namespace) -> None:
    from pipeline.training.models import build_model
    from pipeline.training.models.architecture import architecture_report

    train_flops = 3 * architecture_report(build_model("mnist_cnn", num_classes=10)).total_flops
    rows = {}
    for name, results in runs.items():
        best = max(results, key=lambda r: n_train / statistics.median(r["epoch_s"][1:]))
        steady = statistics.median(best["epoch_s"][1:])
        rows[name] = {"name": name, "steady_img_s": round(n_train / steady, 1),
                      "first_epoch_s": round(best["epoch_s"][0], 2),
                      "worst_epoch_s": round(max(best["epoch_s"][1:]), 2),
                      "steady_epoch_s": round(steady, 2), "wall_s": round(best["wall_s"], 1),
                      "gflop_s": round(train_flops * n_train / steady / 1e9, 1)}
        rows[name]["pct_of_peak"] = round(100 * rows[name]["gflop_s"] / peak, 1)
    seed = rows["seed model.fit(numpy)"]
    print(f"\nQ6 mnist_cnn, {n_train} training + {n_val} validation images 28×28, batch {BATCH}, {args.epochs} epochs, "
          f"best of {args.rounds} rounds; {os.cpu_count()} CPUs; training FLOPs/image {train_flops / 1e6:.2f} M; "
          f"matmul peak {peak:.1f} GFLOP/s\n")
    cols = ("steady_img_s", "steady_epoch_s", "worst_epoch_s", "first_epoch_s", "wall_s", "gflop_s", "pct_of_peak")
    print(f"{'contender':<30}" + "".join(f"{c:>15}" for c in cols) + f"{'× seed':>9}")
    for name, row in rows.items():
        print(f"{name:<30}" + "".join(f"{row[c]:>15}" for c in cols)
              + f"{row['steady_img_s'] / seed['steady_img_s']:>8.2f}×")
    ours, tuned = rows["ours run_train"], rows["ours run_train, autotune on"]
    print(json.dumps({"benchmark": "training", "model": "mnist_cnn", "n_train": n_train, "epochs": args.epochs,
                      "rows": list(rows.values()), "matmul_peak_gflop_s": round(peak, 1),
                      "train_mflop_per_image": round(train_flops / 1e6, 2),
                      "ratio_steady_vs_seed": round(ours["steady_img_s"] / seed["steady_img_s"], 3),
                      "autotune_on_vs_off_steady": round(tuned["steady_img_s"] / ours["steady_img_s"], 3),
                      "target_ratio": 1.0}))


if __name__ == "__main__":
    main()
