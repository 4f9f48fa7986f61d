"""The default job on the default cohort, seed after seed, and the broken models the gate must stop.

    uv run python benchmarks/bench_default_cohort.py [--seeds 10] [--first-seed 1] [--controls] [--keep DIR]

What a new user gets: for each seed, a fresh project folder with the repository's ``params.yaml``
(only ``base.seed`` changed, and DVC versioning off: the folder is not a git repository) and one
``xrayops run`` as a subprocess, exactly the command a user types. Per run: wall time, test AUC with
its patient-level bootstrap CI, sensitivity CI low at the locked threshold, ECE, the gate's verdict
and whether a champion was set. The first seed's project then runs a second ``xrayops run``: its
gate compares a challenger with the champion, so the ΔAUC interval is printed (on the default cohort
it must not be the degenerate [0, 0] of a cohort every model separates perfectly).

``--controls`` (on the first seed's prepared dataset: the same split, validation and test images):
three broken models go through the real evaluation (``evaluate_scores``: threshold derived on the
validation split, metrics + CIs on test) and the real gate decision (``decide`` with the dataset's
real split certificate and validation result, no champion: the absolute floors only):

Each is calibrated on validation like the default job's models (``train.calibration``).

- untrained: the default architecture with its initial weights;
- shuffled labels: the default architecture trained as the default job trains, on the training images
  with their labels permuted;
- shortcut only: the default architecture trained on images where everything is blanked except the top
  band, where site B's "portable" bar sits (the cohort's spurious cue); test images masked alike.

Each must fail the gate; the table says on which criteria. The last line is JSON. The defaults (10 seeds,
controls) take ≈ 25–30 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
XRAYOPS = str(Path(sys.executable).parent / "xrayops")
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false"}


def project(root: Path, seed: int) -> Path:
    """A fresh project folder: the repository's params.yaml with only the seed (and DVC off) changed."""
    from pipeline.config import apply_overrides

    root.mkdir(parents=True, exist_ok=True)
    params = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()),
                             [f"base.seed={seed}", "data.version_with_dvc=false"])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_job(params: Path, tag: str) -> dict[str, Any]:
    """One ``xrayops run`` (subprocess, as a user types it) → the figures of its summary."""
    summary = params.parent / f"summary-{tag}.json"
    env = {**os.environ, **QUIET, "XRAYOPS_PSEUDONYM_SALT": os.environ.get(
        "XRAYOPS_PSEUDONYM_SALT", "bench-salt-not-secret-0123456789abcdef")}
    started = time.perf_counter()
    proc = subprocess.run([XRAYOPS, "run", "--params", str(params), "--summary", str(summary)], cwd=params.parent,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not summary.exists():
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {"tag": tag, "rc": proc.returncode, "wall_s": round(wall, 1), "error": tail}
    s = json.loads(summary.read_text())
    m, ci = s["metrics"], s["metrics"].get("ci", {})
    registry = s.get("registry") or {}
    gate = registry.get("gate") or {}
    delta = gate.get("versus_champion") or {}
    return {"tag": tag, "rc": 0, "wall_s": round(wall, 1), "auc": m.get("auc"), "auc_ci": ci.get("auc"),
            "sens_ci_low": (ci.get("sensitivity") or [None])[0], "ece": m.get("ece"),
            "promoted": gate.get("promote"), "failed": gate.get("failed") or [],
            "champion": (registry.get("aliases") or {}).get("champion"),
            "delta_auc": delta.get("delta_auc"), "delta_ci": delta.get("ci")}


def _train(images: np.ndarray, labels: np.ndarray, settings: Any, ispec: Any, epochs: int) -> Any:
    """The default architecture compiled as the default job compiles it; ``epochs`` 0 = untrained."""
    import keras

    from pipeline.training.models import build_model
    from pipeline.training.train import compile_model

    keras.utils.set_random_seed(settings.base.seed)
    model = build_model(settings.train.model, image_size=ispec.image_size, channels=ispec.channels,
                        num_classes=2, weights=settings.train.weights)
    compile_model(model, settings, 2)
    if epochs:
        model.fit(images, labels.astype("float32"), epochs=epochs, batch_size=settings.train.batch_size,
                  verbose=0, shuffle=True)
    return model


def _top_band_only(images: np.ndarray) -> np.ndarray:
    """Everything blanked but the top 12 % (where the "portable" bar is stamped)."""
    out = np.zeros_like(images)
    band = max(1, int(round(images.shape[1] * 0.12)))
    out[:, :band] = images[:, :band]
    return out


def controls(params: Path) -> list[dict[str, Any]]:
    """Untrained, shuffled-label and shortcut-only models through the real evaluation and gate decision."""
    from pipeline.config import load_settings
    from pipeline.data.manifest import read_manifest
    from pipeline.data.split import read_split, verify_certificate
    from pipeline.evaluation.evaluate import Scored, evaluate_scores, predict_proba
    from pipeline.registry.decision import Evidence, decide
    from pipeline.registry.gate import data_checks
    from pipeline.training.inputs import InputSpec, check_files, load_images, split_frame
    from pipeline.training.models import get_spec

    settings = load_settings(params)
    dataset_dir = settings.dataset_dir
    spec = get_spec(settings.train.model)
    ispec = InputSpec(settings.train.image_size or spec.image_size, settings.train.channels or spec.channels, 2)
    manifest, split = read_manifest(dataset_dir), read_split(dataset_dir)
    frames = {name: split_frame(manifest, split, name) for name in ("train", "val", "test")}
    images = {name: load_images(check_files(dataset_dir, f["path"].tolist()), ispec) for name, f in frames.items()}
    labels = {name: f["label_index"].to_numpy() for name, f in frames.items()}
    certificate = verify_certificate(dataset_dir, check_manifest=False)["certificate_sha256"]
    checks = data_checks(dataset_dir, certificate)
    rng = np.random.default_rng(settings.base.seed)
    epochs = settings.train.epochs
    broken = {
        "untrained": (lambda x: x, _train(images["train"], labels["train"], settings, ispec, 0)),
        "shuffled labels": (lambda x: x, _train(images["train"], rng.permutation(labels["train"]), settings,
                                                ispec, epochs)),
        "shortcut only": (_top_band_only, _train(_top_band_only(images["train"]), labels["train"], settings,
                                                 ispec, epochs)),
    }
    rows = []
    for name, (view, model) in broken.items():
        if settings.train.calibration != "none":  # as the default job does after training
            import tensorflow as tf

            from pipeline.training.calibrate import calibrate_binary

            val = tf.data.Dataset.from_tensor_slices((view(images["val"]), labels["val"])).batch(64)
            calibrate_binary(model, val, settings.train.calibration)
        scored = {s: Scored(frames[s], labels[s], predict_proba(model, view(images[s]))) for s in ("val", "test")}
        result = evaluate_scores(settings, scored["val"], scored["test"], 2)
        decision = decide(Evidence("binary", result.metrics, result.ci, checks), settings.promote,
                          model="control", challenger_version=name)
        rows.append({"tag": name, "auc": result.metrics.get("auc"), "auc_ci": result.ci.get("auc"),
                     "sens_ci_low": result.ci.get("sensitivity", [None])[0], "ece": result.metrics.get("ece"),
                     "promoted": decision.promote, "failed": decision.failed})
    return rows


def _fmt(row: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    ci = row.get("auc_ci") or [None, None]
    dci = row.get("delta_ci")
    delta = "" if row.get("delta_auc") is None else f"{row['delta_auc']:+.3f} [{dci[0]:+.3f}, {dci[1]:+.3f}]"
    if row.get("error"):
        return f"{row['tag']:<16} rc={row['rc']} FAILED: {row['error'].splitlines()[-1][:90]}"
    return (f"{row['tag']:<16} {row.get('wall_s', ''):>7} {num(row.get('auc')):>6} [{num(ci[0])}, {num(ci[1])}] "
            f"{num(row.get('sens_ci_low')):>8} {num(row.get('ece')):>6} {'yes' if row.get('promoted') else 'no':>8} "
            f"{','.join(row.get('failed') or []) or '-':<28} {delta}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--controls", action="store_true", help="also run the three broken models (first seed's data)")
    ap.add_argument("--keep", type=Path, help="keep the project folders here (default: a temp folder, removed)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="xrayops-cohort-"))
    rows: list[dict[str, Any]] = []
    print(f"{'run':<16} {'wall s':>7} {'AUC':>6} {'AUC CI':<16} {'sens lo':>8} {'ECE':>6} {'promoted':>8} "
          f"{'failed criteria':<28} ΔAUC [CI] vs champion", flush=True)
    try:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        for seed in seeds:
            rows.append(run_job(project(base / f"seed-{seed}", seed), f"seed {seed}"))
            print(_fmt(rows[-1]), flush=True)
        first = base / f"seed-{seeds[0]}" / "params.yaml"
        rows.append(run_job(first, f"seed {seeds[0]} rerun"))
        print(_fmt(rows[-1]), flush=True)
        if args.controls:
            for row in controls(first):
                rows.append(row)
                print(_fmt(row), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    runs = [r for r in rows if r["tag"].startswith("seed") and not r["tag"].endswith("rerun")]
    aucs = [r["auc"] for r in runs if r.get("auc") is not None]
    report = {"runs": len(runs), "champions": sum(1 for r in runs if r.get("champion")),
              "auc_min": min(aucs, default=None), "auc_max": max(aucs, default=None),
              "auc_in_0.85_0.93": sum(1 for a in aucs if 0.85 <= a <= 0.93),
              "wall_s_max": max((r["wall_s"] for r in runs), default=None),
              "controls_failed_gate": [r["tag"] for r in rows if r["tag"] in ("untrained", "shuffled labels",
                                                                              "shortcut only") and not r["promoted"]],
              "rows": rows}
    print(f"\n{report['champions']}/{report['runs']} runs ended with a champion; test AUC {report['auc_min']}–"
          f"{report['auc_max']} ({report['auc_in_0.85_0.93']} in 0.85–0.93); slowest run {report['wall_s_max']} s")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
