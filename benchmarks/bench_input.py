"""Image input pipeline throughput: ours vs the seed's Q9 ``ImageDataGenerator.flow_from_directory``.

    flock /tmp/xrayops-heavy.lock uv run python benchmarks/bench_input.py [--images 600] [--epochs 8] [--rounds 2]

All contenders read the same folder (``ROOT/<class>/<image>.png``, 256×256 8-bit grayscale
radiograph-like images, generated once into ``$XRAYOPS_BENCH_CACHE`` or
``~/.cache/xrayops/bench-input``), produce 150×150×3 float batches of 32 with binary labels,
and apply the seed's Q9 augmentations: rotation 15°, width/height shift 0.1, shear 0.1°,
zoom 0.1, horizontal flip, fill ``nearest`` (flip is on here only to match the seed):

- seed: ``tf.keras.preprocessing.image.ImageDataGenerator(...).flow_from_directory`` (legacy);
- keras layers: ``keras.utils.image_dataset_from_directory`` + one ``keras.layers.Random*``
  layer per transform (the documented modern path), for reference;
- ours: ``pipeline.training.inputs.directory_dataset`` (parallel decode, cache of resized images,
  shuffle, one fused affine resampling per batch, prefetch); also with tf.data's autotuner
  switched on, to test the claim that it stalls when an epoch's iterator starts/ends.

Each contender runs ``--epochs`` epochs (a new iterator per epoch, as ``fit`` does); the
first epoch includes decoding, later ones are the steady state. Rounds alternate the
contenders; best round per contender. Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIDE, TARGET, BATCH = 256, 150, 32
SEED_AUG = {"rotation_deg": 15.0, "translate": 0.1, "zoom": 0.1, "shear_deg": 0.1, "horizontal_flip": True,
            "contrast": 0.0, "brightness": 0.0, "fill_mode": "nearest"}


def image_folder(n: int) -> Path:
    """``n`` radiograph-like PNGs in two class folders (generated once, reused)."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    base = Path(os.environ.get("XRAYOPS_BENCH_CACHE") or Path.home() / ".cache" / "xrayops" / "bench-input")
    root = base / f"png{SIDE}-{n}-v1"
    if (root / ".done").exists():
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    for i in range(n):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        lungs = np.exp(-(((xx - 0.32) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
            np.exp(-(((xx - 0.68) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2))
        img = 0.75 - 0.45 * lungs + gaussian_filter(rng.normal(0, 0.25, (SIDE, SIDE)), 3)
        if label == "PNEUMONIA":
            img += 0.25 * np.exp(-(((xx - rng.uniform(0.25, 0.75)) / 0.1) ** 2 + ((yy - 0.6) / 0.1) ** 2))
        out = root / label / f"img_{i:05d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(out)
    (root / ".done").write_text(f"{n}\n")
    return root


def time_epochs(make_epoch: Callable[[], Iterable[Any]], epochs: int) -> list[float]:
    """Seconds per epoch, each epoch a fresh iterator consumed to the end (image count checked by caller)."""
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = 0
        for x, _ in make_epoch():
            count += len(x)
        seconds.append(time.perf_counter() - start)
        time_epochs.last_count = count  # type: ignore[attr-defined]
    return seconds


def seed_contender(root: Path) -> Callable[[], Iterable[Any]]:
    """The seed's Q9 generator, verbatim settings (150×150, batch 32, binary)."""
    import tensorflow as tf

    gen = tf.keras.preprocessing.image.ImageDataGenerator(
        rescale=1.0 / 255, rotation_range=15, width_shift_range=0.1, height_shift_range=0.1, shear_range=0.1,
        zoom_range=0.1, horizontal_flip=True, fill_mode="nearest")
    flow = gen.flow_from_directory(str(root), target_size=(TARGET, TARGET), batch_size=BATCH, class_mode="binary",
                                   seed=0)

    def epoch() -> Iterable[Any]:
        for _ in range(len(flow)):
            yield next(flow)

    return epoch


def keras_layers_contender(root: Path) -> Callable[[], Iterable[Any]]:
    import keras
    import tensorflow as tf

    ds = keras.utils.image_dataset_from_directory(str(root), image_size=(TARGET, TARGET), batch_size=BATCH,
                                                  label_mode="binary", seed=0, color_mode="rgb", verbose=False)
    aug = keras.Sequential([keras.layers.Rescaling(1.0 / 255),
                            keras.layers.RandomRotation(15 / 360, fill_mode="nearest", seed=1),
                            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=2),
                            keras.layers.RandomShear(0.1 / 45, 0.1 / 45, fill_mode="nearest", seed=3),
                            keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=4),
                            keras.layers.RandomFlip("horizontal", seed=5)])
    ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    return lambda: ds


def ours_contender(root: Path, autotune: bool = False) -> Callable[[], Iterable[Any]]:
    import tensorflow as tf

    from pipeline import inputs
    from pipeline.config import AugmentSection

    if autotune:  # the tf.data default: autotuner on, AUTOTUNE parallelism
        original_options, original_calls = inputs.dataset_options, inputs.parallel_calls

        def tuned() -> Any:
            options = original_options()
            options.autotune.enabled = True
            return options

        inputs.dataset_options, inputs.parallel_calls = tuned, lambda: tf.data.AUTOTUNE
    try:
        ds, _ = inputs.directory_dataset(root, inputs.InputSpec(TARGET, 3, 2), batch_size=BATCH, training=True,
                                         seed=0, cache=True, augment=AugmentSection(**SEED_AUG))
    finally:
        if autotune:
            inputs.dataset_options, inputs.parallel_calls = original_options, original_calls
    return lambda: ds


def summarise(name: str, seconds: list[float], n: int) -> dict[str, Any]:
    steady = seconds[1:] or seconds
    return {"name": name, "first_epoch_s": round(seconds[0], 2), "steady_epoch_s": round(statistics.median(steady), 3),
            "worst_steady_epoch_s": round(max(steady), 3), "first_img_s": round(n / seconds[0], 1),
            "steady_img_s": round(n / statistics.median(steady), 1), "overall_img_s": round(n * len(seconds)
                                                                                                / sum(seconds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = image_folder(args.images)
    contenders = {"seed ImageDataGenerator": lambda: seed_contender(root),
                  "keras Random* layers": lambda: keras_layers_contender(root),
                  "ours (autotune off)": lambda: ours_contender(root),
                  "ours (autotune on)": lambda: ours_contender(root, autotune=True)}
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for name, build in contenders.items():
            seconds = time_epochs(build(), args.epochs)
            assert time_epochs.last_count == args.images, (name, time_epochs.last_count)  # type: ignore[attr-defined]
            row = summarise(name, seconds, args.images)
            if name not in best or row["overall_img_s"] > best[name]["overall_img_s"]:
                best[name] = row
    print_table(best, args)


def print_table(best: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    seed = best["seed ImageDataGenerator"]
    cols = ("first_img_s", "steady_img_s", "overall_img_s", "worst_steady_epoch_s")
    print(f"\n{args.images} images 256×256 PNG → 150×150×3, batch {BATCH}, {args.epochs} epochs, "
          f"seed Q9 augmentations; best of {args.rounds} rounds; {os.cpu_count()} CPUs\n")
    print(f"{'contender':<26}" + "".join(f"{c:>22}" for c in cols) + f"{'× seed (overall)':>18}")
    for name, row in best.items():
        ratio = row["overall_img_s"] / seed["overall_img_s"]
        print(f"{name:<26}" + "".join(f"{row[c]:>22}" for c in cols) + f"{ratio:>17.1f}×")
    ours, tuned = best["ours (autotune off)"], best["ours (autotune on)"]
    result = {"benchmark": "input_pipeline", "images": args.images, "epochs": args.epochs, "rows": list(best.values()),
              "ratio_overall_vs_seed": round(ours["overall_img_s"] / seed["overall_img_s"], 2),
              "ratio_steady_vs_seed": round(ours["steady_img_s"] / seed["steady_img_s"], 2),
              "ratio_first_epoch_vs_seed": round(ours["first_img_s"] / seed["first_img_s"], 2),
              "autotune_on_vs_off_overall": round(tuned["overall_img_s"] / ours["overall_img_s"], 2),
              "target_ratio": 5.0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
