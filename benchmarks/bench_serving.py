"""Serving latency: the real API (``xrayops serve``, compiled ONNX Runtime path) vs a naive server
that calls ``model.predict`` per request — same model, same machine, one run.

    flock /tmp/xrayops-heavy.lock uv run python benchmarks/bench_serving.py [--requests 100] [--load 200]

For each model (EfficientNetB0 at 224×224 from the zoo with ``weights=none``, and the small
``xray_cnn`` at its default 128×128) the script registers the model as ``champion`` in a
temporary MLflow registry (ONNX export with parity check, embedding PCA), then, one server at
a time on a loopback port:

- ours: ``python -m pipeline.cli serve`` — input gate, ONNX Runtime with the embedding output,
  image features, production log (buffered Parquet), request ids;
- naive: a minimal FastAPI app (in this file) that decodes the upload with Pillow, resizes as
  training did, and calls ``model.predict`` on the Keras model (the seed's way; no gate, no log).

Each server gets the same 224×224 8-bit PNG: 10 warm-up requests, then ``--requests`` sequential
requests (p50/p95 of client-side wall time). Ours also takes a bounded concurrent load
(``--load`` requests, 8 in flight) that must finish with 0 errors. Prints a table; the last line
is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, UploadFile

REPO = Path(__file__).resolve().parents[1]
MODELS = {"efficientnet_b0": 224, "xray_cnn": 128}


# --------------------------------------------------------------------------- naive server (child process)


def naive_app(model_path: str, size: int, channels: int) -> Any:
    """model.predict per request: decode, resize like training, predict."""
    import keras
    import tensorflow as tf
    from PIL import Image

    from pipeline.training.models.zoo import register_custom_objects

    register_custom_objects()
    model = keras.models.load_model(model_path, compile=False)
    app = FastAPI()

    @app.post("/predict")
    def predict(file: Annotated[UploadFile, File()]) -> dict[str, float]:
        img = np.asarray(Image.open(io.BytesIO(file.file.read())).convert("L"), np.float32) / 255.0
        x = tf.image.resize(np.repeat(img[..., None], channels, axis=-1), (size, size), antialias=True)
        return {"probability": float(model.predict(x.numpy()[None], verbose=0)[0, 0])}

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def run_naive(model_path: str, size: int, channels: int, port: int) -> None:
    import uvicorn

    uvicorn.run(naive_app(model_path, size, channels), host="127.0.0.1", port=port, log_level="warning")


# --------------------------------------------------------------------------- set-up


def write_project(root: Path) -> Path:
    import yaml

    from pipeline.config import apply_overrides

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = apply_overrides(params, ["serve.require_api_key=false", "serve.alias_poll_s=3600",
                                      "serve.rate_limit_per_s=null",  # a latency benchmark, not a rate-limit one
                                      "serve.log_flush_s=1.0", "data.version_with_dvc=false"])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def register(settings: Any, name: str, size: int, out_dir: Path) -> tuple[Path, int]:
    """Build zoo model ``name``, register it as champion (ONNX export + PCA); returns (.keras path, channels)."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline.monitoring.drift import log_reference, reference_profile
    from pipeline.registry.contract import CHAMPION, PARITY_TAG, GateTags, VersionTags
    from pipeline.registry.export import log_exports
    from pipeline.serving.predictor import fit_pca, score_with_embeddings
    from pipeline.tracking import configure_mlflow, ensure_experiment, pip_requirements
    from pipeline.training.models import build_model

    model = build_model(name, image_size=size, num_classes=2, **({"weights": "none"} if "net" in name else {}))
    channels = int(model.inputs[0].shape[-1])
    rng = np.random.default_rng(0)
    sample = rng.random((16, size, size, channels), dtype=np.float32)
    model(sample[:2])
    keras_path = out_dir / f"{name}.keras"
    model.save(keras_path)
    client = configure_mlflow(settings)
    client.create_registered_model(settings.registered_model)
    with mlflow.start_run(experiment_id=ensure_experiment(settings)) as run:
        signature = infer_signature(sample[:2], np.asarray(model(sample[:2])))
        uri = mlflow.keras.log_model(model, name="model", signature=signature,
                                     pip_requirements=pip_requirements()).model_uri
    proba, emb, layer = score_with_embeddings(model, sample)
    pca = fit_pca(emb, settings.monitor.embedding_components, layer)
    import pandas as pd

    log_reference(settings, run.info.run_id, reference_profile(pd.DataFrame(index=range(16)), proba, 0.5,
                                                               pca.transform(emb)), pca)
    t0 = time.perf_counter()
    tags = log_exports(model, run.info.run_id, sample[:4], onnx=True)
    print(f"  {name}: ONNX export + parity {time.perf_counter() - t0:.1f} s ({tags.get(PARITY_TAG)})",
          flush=True)
    tags.update(VersionTags(input_size=size, input_channels=channels, classes=["NORMAL", "PNEUMONIA"],
                            positive_class="PNEUMONIA", operating_threshold=0.5, model_arch=name).to_tags())
    tags.update(GateTags(GateTags.PASS).to_tags())
    mv = client.create_model_version(settings.registered_model, source=uri, run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias(settings.registered_model, CHAMPION, mv.version)
    return keras_path, channels


# --------------------------------------------------------------------------- measuring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready in 300 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sequential(url: str, image: bytes, n: int) -> dict[str, float]:
    import httpx

    with httpx.Client(timeout=120) as client:
        for _ in range(10):
            client.post(url, files={"file": ("x.png", image)}).raise_for_status()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.post(url, files={"file": ("x.png", image)}).raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "mean_ms": float(np.mean(times))}


def concurrent(url: str, images: list[bytes], n: int, in_flight: int = 8) -> dict[str, float]:
    import httpx

    def one(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        try:
            status = client.post(url, files={"file": ("x.png", images[i % len(images)])}).status_code
        except httpx.HTTPError:
            status = 0
        return status, (time.perf_counter() - t0) * 1000

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=in_flight)) as client, \
            ThreadPoolExecutor(in_flight) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    lat = [t for _, t in results]
    return {"requests": n, "in_flight": in_flight, "errors": sum(s != 200 for s, _ in results),
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "throughput_rps": n / wall}


def test_images(n: int = 8) -> list[bytes]:
    from PIL import Image

    from pipeline.data.synthetic import CohortSpec, Patient, render_image, to_pixels

    spec = CohortSpec(n_patients=1, images_per_patient=(1, 1), prevalence=0.5, image_size=224, bit_depth=8,
                      bad_files=0, shift=0.0, seed=5)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        img = render_image(Patient(f"B{i}", "NORMAL", "F", 50, "PA", 1, i), 0, spec)
        Image.fromarray(to_pixels(img, 8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def bench_model(name: str, size: int, root: Path, args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    from pipeline.config import load_settings, with_overrides

    params = root / "params.yaml"
    sets = [f"promote.registered_model=bench-{name}", f"paths.production_log={root / 'log' / name}"]
    settings = with_overrides(load_settings(params), sets)
    keras_path, channels = register(settings, name, size, root)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    row: dict[str, Any] = {"model": name, "input": f"{size}x{size}x{channels}"}
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--params", str(params), *[a for s in sets for a in ("--set", s)]]
    proc = start(cmd, port, env)
    try:
        row["ours"] = sequential(f"http://127.0.0.1:{port}/v1/predict", images[0], args.requests)
        if args.load:
            row["load"] = concurrent(f"http://127.0.0.1:{port}/v1/predict", images, args.load)
    finally:
        stop(proc)
    from pipeline.serving import production_log

    row["logged_rows"] = production_log.count_rows(settings.production_log)
    port = free_port()
    proc = start([sys.executable, __file__, "--naive-server", str(keras_path), str(size), str(channels), str(port)],
                 port, env)
    try:
        row["naive"] = sequential(f"http://127.0.0.1:{port}/predict", images[0], args.requests)
    finally:
        stop(proc)
    row["speedup_p50"] = row["naive"]["p50_ms"] / row["ours"]["p50_ms"]
    row["speedup_p95"] = row["naive"]["p95_ms"] / row["ours"]["p95_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per server")
    parser.add_argument("--load", type=int, default=200, help="concurrent requests (8 in flight) against ours")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--naive-server", nargs=4, metavar=("MODEL", "SIZE", "CHANNELS", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        path, size, channels, port = args.naive_server
        run_naive(path, int(size), int(channels), int(port))
        return
    from pipeline.runtime import quiet_tools

    quiet_tools()
    os.environ.setdefault("XRAYOPS_PSEUDONYM_SALT", "bench-salt-not-secret-0123456789abcdef")
    images = test_images()
    rows = []
    with tempfile.TemporaryDirectory(prefix="xrayops-bench-serving-") as tmp:
        write_project(Path(tmp))
        for name in args.models.split(","):
            print(f"benchmarking {name} …", flush=True)
            rows.append(bench_model(name, MODELS[name], Path(tmp), args, images))
    print_table(rows, args)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nOne 224x224 PNG per request, {args.requests} sequential requests after 10 warm-up; "
          f"{os.cpu_count()} CPU cores\n")
    print(f"{'model':<16}{'input':<12}{'naive p50':>11}{'naive p95':>11}{'ours p50':>10}{'ours p95':>10}"
          f"{'p50 x':>8}{'p95 x':>8}")
    for r in rows:
        print(f"{r['model']:<16}{r['input']:<12}{r['naive']['p50_ms']:>9.1f}ms{r['naive']['p95_ms']:>9.1f}ms"
              f"{r['ours']['p50_ms']:>8.1f}ms{r['ours']['p95_ms']:>8.1f}ms{r['speedup_p50']:>7.1f}x"
              f"{r['speedup_p95']:>7.1f}x")
    print("\nBounded concurrent load on ours (8 in flight):")
    for r in rows:
        if "load" in r:
            ld = r["load"]
            print(f"  {r['model']:<16}{ld['requests']} requests, {ld['errors']} errors, p50 {ld['p50_ms']:.1f} ms, "
                  f"p95 {ld['p95_ms']:.1f} ms, {ld['throughput_rps']:.1f} req/s; production log rows "
                  f"{r['logged_rows']}")
    print(json.dumps({"benchmark": "serving", "cpu_count": os.cpu_count(), "requests": args.requests,
                      "results": _rounded(rows)}))


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
