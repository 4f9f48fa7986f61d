"""API under bounded load: authenticated predictions while unauthenticated clients push 30 MB uploads.

    flock /tmp/xrayops-heavy.lock uv run python benchmarks/bench_api_load.py [--requests 500] [--in-flight 32]
        [--big 50] [--big-mb 30] [--params PATH]

Starts ``xrayops serve`` (a real uvicorn process, loopback only) on a tiny champion trained here through the
library path (ingest → validate → split → train → evaluate → promote, ≈ 30 s), or on the champion of
``--params``. Then, at the same time:

- ``--requests`` authenticated ``POST /v1/predict`` of 256×256 PNGs, ``--in-flight`` at once (httpx, keep-alive);
- ``--big`` unauthenticated uploads of ``--big-mb`` MB each, 4 at once, from raw sockets that send the headers
  and then the body as fast as the kernel takes it (what a careless or hostile client does), timing how long
  the server takes to refuse each one (first byte of its answer) and how much the client got to send by then.

While it runs, the server's resident memory is sampled from ``/proc/<pid>/status`` every 20 ms and the bytes the
server process read (``rchar`` of ``/proc/<pid>/io``: sockets included) are counted. The rate limit is off for
this run (``--rate-limit``; it has its own tests): the run measures capacity, queue and refusal, and every
authenticated request must succeed. Fixed counts, a time limit per request (``--timeout``), loopback only.
Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789abcdef"
BOUNDARY = "xrayopsbenchboundary"


# --------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    output: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def start_server(params: Path, sets: list[str], output: Path, *, key: str = KEY, timeout: float = 300) -> Server:
    """``python -m pipeline.cli serve`` on a free loopback port; returns once ``/readyz`` answers 200.

    Raises:
        RuntimeError: the server exited or was not ready in ``timeout`` s (its output attached).
    """
    import httpx

    port = free_port()
    env = {**os.environ, "XRAYOPS_API_KEY": key}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user's shell has: the server must quiet TensorFlow itself
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--params", str(params), *[a for s in sets for a in ("--set", s)]]
    with output.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(proc, port, output)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {server.text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server not ready in {timeout:.0f} s: {server.text()[-3000:]}")


def stop_server(server: Server) -> int:
    """SIGINT (graceful: the production log is flushed), then kill after 60 s; returns the exit code."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return int(server.proc.returncode)


def proc_value(pid: int, name: str, key: str) -> int:
    """A number from ``/proc/<pid>/<name>`` (``status``: kB values → bytes; ``io``: bytes)."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key + ":"):
            value = int(line.split()[1])
            return value * 1024 if line.rstrip().endswith("kB") else value
    raise KeyError(f"{key} not in /proc/{pid}/{name}")


class RssSampler:
    """Samples a process's VmRSS every ``every_s`` in a thread; ``peak`` is the largest sample."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid, self.every_s, self.peak, self.samples = pid, every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, proc_value(self.pid, "status", "VmRSS"))
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- clients


def png_images(n: int = 8, side: int = 256) -> list[bytes]:
    from PIL import Image

    from pipeline.data.synthetic import CohortSpec, Patient, render_image, to_pixels

    spec = CohortSpec(n_patients=1, images_per_patient=(1, 1), prevalence=0.5, image_size=side, bit_depth=8,
                      bad_files=0, shift=0.0, seed=11)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        patient = Patient(f"L{i}", "PNEUMONIA" if i % 2 else "NORMAL", "F", 50, "PA", 1, i)
        Image.fromarray(to_pixels(render_image(patient, 0, spec), 8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@dataclass
class Refusal:
    status: int | None  # HTTP status of the server's answer (None: closed without a readable answer)
    seconds: float  # from connect to the first byte of the answer (or to the close)
    sent_bytes: int  # body bytes the client had handed to the kernel by then
    total_bytes: int


def raw_upload(port: int, size: int, *, key: str | None = None, timeout: float = 30.0,
               headers_first_s: float = 0.0) -> Refusal:
    """POST a well-formed multipart body of ``size`` bytes (one ``file`` part of zeros) to ``/v1/predict`` from a
    raw socket (without a key unless ``key``), sending as fast as the kernel takes it and reading whatever comes
    back; ``headers_first_s`` > 0 waits that long for an answer after the headers before sending any body byte."""
    auth = f"X-API-Key: {key}\r\n" if key else ""
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bench-raw-upload\r\n{auth}"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {size}\r\n\r\n").encode()
    prefix = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
              f"Content-Type: application/octet-stream\r\n\r\n").encode()
    suffix = f"\r\n--{BOUNDARY}--\r\n".encode()
    filler = size - len(prefix) - len(suffix)
    chunk = bytes(256 * 1024)

    def body(offset: int) -> bytes:  # the body from ``offset``, at most one chunk
        if offset < len(prefix):
            return prefix[offset:]
        if offset < len(prefix) + filler:
            return chunk[: len(prefix) + filler - offset]
        return suffix[offset - len(prefix) - filler:]

    started = time.perf_counter()
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        if headers_first_s > 0:
            select.select([sock], [], [], headers_first_s)
        deadline = started + timeout
        while time.perf_counter() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < size else [], [], 1.0)
            if readable:
                try:
                    answer = sock.recv(4096)
                except OSError:
                    answer = b""
                break
            if writable:
                try:
                    sent += sock.send(body(sent))
                except OSError:  # reset or closed by the server: see whether an answer is there
                    try:
                        sock.setblocking(True)
                        sock.settimeout(1.0)
                        answer = sock.recv(4096)
                    except OSError:
                        answer = b""
                    break
        seconds = time.perf_counter() - started
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return Refusal(status, seconds, sent, size)


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    wall_s: float = 0.0
    refusals: list[Refusal] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    rss_hwm: int = 0
    server_read_bytes: int = 0
    auth_body_bytes: int = 0

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms or [0.0])
        refused = np.asarray([r.seconds * 1000 for r in self.refusals] or [0.0])
        return {
            "requests": len(self.latencies_ms), "errors": self.errors, "statuses": self.statuses,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "max_ms": float(lat.max()), "throughput_rps": len(self.latencies_ms) / self.wall_s if self.wall_s else 0,
            "big_uploads": len(self.refusals),
            "big_refused_401": sum(r.status == 401 for r in self.refusals),
            "big_closed_without_answer": sum(r.status is None for r in self.refusals),
            "big_refusal_p50_ms": float(np.percentile(refused, 50)), "big_refusal_max_ms": float(refused.max()),
            "big_sent_max_mb": max((r.sent_bytes for r in self.refusals), default=0) / 1e6,
            "big_offered_mb": sum(r.total_bytes for r in self.refusals) / 1e6,
            "server_read_mb": self.server_read_bytes / 1e6, "auth_body_mb": self.auth_body_bytes / 1e6,
            "rss_before_mb": self.rss_before / 2**20, "rss_peak_mb": self.rss_peak / 2**20,
            "rss_after_mb": self.rss_after / 2**20, "rss_hwm_mb": self.rss_hwm / 2**20,
        }


def run_load(server: Server, images: list[bytes], *, requests: int, in_flight: int, big: int, big_bytes: int,
             big_in_flight: int = 4, timeout: float = 60.0, key: str = KEY) -> LoadResult:
    """Authenticated predictions and unauthenticated big uploads at the same time (see the module docstring)."""
    import httpx

    pid = server.proc.pid
    url = f"{server.url}/v1/predict"
    result = LoadResult()
    with httpx.Client(timeout=timeout) as warm:  # the first requests build the ONNX session's caches
        for image in images[:4]:
            warm.post(url, files={"file": ("x.png", image)}, headers={"X-API-Key": key}).raise_for_status()
    result.rss_before = proc_value(pid, "status", "VmRSS")
    read_before = proc_value(pid, "io", "rchar")
    lock = threading.Lock()

    def authenticated(i: int) -> None:
        image = images[i % len(images)]
        started = time.perf_counter()
        try:
            status = str(client.post(url, files={"file": (f"x{i}.png", image)}, headers={"X-API-Key": key}).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        with lock:
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.errors += status != "200"
            result.auth_body_bytes += len(image)

    def unauthenticated(_: int) -> None:
        refusal = raw_upload(server.port, big_bytes, timeout=timeout)
        with lock:
            result.refusals.append(refusal)

    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    with httpx.Client(timeout=timeout, limits=limits) as client, RssSampler(pid) as rss, \
            ThreadPoolExecutor(in_flight) as pool, ThreadPoolExecutor(big_in_flight) as big_pool:
        started = time.perf_counter()
        big_done = [big_pool.submit(unauthenticated, i) for i in range(big)]
        auth_done = [pool.submit(authenticated, i) for i in range(requests)]
        for future in [*auth_done, *big_done]:
            future.result()
        result.wall_s = time.perf_counter() - started
    result.rss_peak = max(rss.peak, result.rss_before)
    result.rss_after = proc_value(pid, "status", "VmRSS")
    result.rss_hwm = proc_value(pid, "status", "VmHWM")
    result.server_read_bytes = proc_value(pid, "io", "rchar") - read_before
    return result


# --------------------------------------------------------------------------- set-up


def tiny_champion(root: Path) -> Path:
    """A tiny project under ``root`` whose trained model is ``champion`` (the test suite's library path, lenient
    gate, no DVC); returns its params.yaml."""
    from tests.conftest import train_champion

    train_champion(root)
    return root / "params.yaml"  # written there by tests.conftest.write_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="authenticated predictions")
    parser.add_argument("--in-flight", type=int, default=32, help="authenticated requests at once")
    parser.add_argument("--big", type=int, default=50, help="unauthenticated big uploads (4 at once)")
    parser.add_argument("--big-mb", type=float, default=30, help="size of each unauthenticated upload, MB")
    parser.add_argument("--timeout", type=float, default=60, help="client time limit per request, s")
    parser.add_argument("--rate-limit", default="null", help="serve.rate_limit_per_s for the run (null = off)")
    parser.add_argument("--params", type=Path, help="an existing project with a champion (default: train one)")
    args = parser.parse_args()
    from pipeline.runtime import configure_logging, quiet_tools

    quiet_tools()
    configure_logging("WARNING")
    os.environ.setdefault("XRAYOPS_PSEUDONYM_SALT", "bench-salt-not-secret-0123456789abcdef")
    with tempfile.TemporaryDirectory(prefix="xrayops-bench-load-") as tmp:
        root = Path(tmp)
        if args.params is None:
            print("training a tiny champion (≈ 30 s) …", flush=True)
        params = args.params or tiny_champion(root)
        sets = [f"paths.production_log={root / 'log'}", "serve.alias_poll_s=3600",
                f"serve.rate_limit_per_s={args.rate_limit}"]
        server = start_server(params, sets, root / "server.log")
        try:
            startup = [line for line in server.text().splitlines() if line.strip()]
            result = run_load(server, png_images(), requests=args.requests, in_flight=args.in_flight, big=args.big,
                              big_bytes=int(args.big_mb * 1e6), timeout=args.timeout)
        finally:
            code = stop_server(server)
        print_table(result.summary(), args, startup, code)


def print_table(s: dict[str, Any], args: argparse.Namespace, startup: list[str], exit_code: int) -> None:
    print(f"\n{os.cpu_count()} CPU cores; server: xrayops serve (defaults of params.yaml, rate limit "
          f"{args.rate_limit}); start-up output ({len(startup)} line(s)):")
    for line in startup:
        print(f"  | {line}")
    print(f"\n{'measure':<52}{'value':>14}")
    rows = [
        ("authenticated requests (in flight)", f"{s['requests']} ({args.in_flight})"),
        ("  errors (non-200 or transport)", f"{s['errors']}"),
        ("  latency p50 / p95 / max, ms", f"{s['p50_ms']:.0f} / {s['p95_ms']:.0f} / {s['max_ms']:.0f}"),
        ("  throughput, req/s", f"{s['throughput_rps']:.1f}"),
        (f"unauthenticated {args.big_mb:g} MB uploads (4 at once)", f"{s['big_uploads']}"),
        ("  answered 401 / closed without answer", f"{s['big_refused_401']} / {s['big_closed_without_answer']}"),
        ("  time to refusal p50 / max, ms", f"{s['big_refusal_p50_ms']:.1f} / {s['big_refusal_max_ms']:.1f}"),
        ("  most body bytes a client got to send, MB", f"{s['big_sent_max_mb']:.2f}"),
        ("server bytes read during the run / offered, MB",
         f"{s['server_read_mb']:.1f} / {s['big_offered_mb'] + s['auth_body_mb']:.0f}"),
        ("server RSS before / peak (sampled) / after, MiB",
         f"{s['rss_before_mb']:.0f} / {s['rss_peak_mb']:.0f} / {s['rss_after_mb']:.0f}"),
        ("server RSS high-water mark (VmHWM, whole life), MiB", f"{s['rss_hwm_mb']:.0f}"),
        ("server exit code after SIGINT", f"{exit_code}"),
    ]
    for name, value in rows:
        print(f"{name:<52}{value:>14}")
    print(json.dumps({"benchmark": "api_load", "cpu_count": os.cpu_count(), "requests": args.requests,
                      "in_flight": args.in_flight, "big": args.big, "big_mb": args.big_mb,
                      "rate_limit": args.rate_limit, "startup_lines": len(startup), "exit_code": exit_code,
                      "results": {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}}))


if __name__ == "__main__":
    main()
