"""MultiWorkerMirroredStrategy from TF_CONFIG: two local worker processes on loopback train one epoch together."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
from mlflow import MlflowClient

from pipeline.config import Settings

pytestmark = pytest.mark.slow

WORKER = """
import json, sys
import numpy as np
from pipeline.config import load_settings
from pipeline.training.train import run_train

result = run_train(load_settings(sys.argv[1]))
weights = np.concatenate([np.ravel(w) for w in result.model.get_weights()])
print("RESULT " + json.dumps({"hardware": result.hardware, "run_id": result.run_id,
                              "weights_sum": float(np.abs(weights).sum()), "epochs": result.epochs_run}))
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_two_workers_train_one_epoch_in_sync(train_settings: Callable[..., Settings]) -> None:
    settings = train_settings("train.epochs=1", "train.batch_size=8", "train.model=mnist_cnn")
    hosts = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(settings.root / "params.yaml")],
                                      cwd=settings.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    finished = []
    for proc in procs:
        try:
            finished.append(proc.communicate(timeout=240))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("multi-worker training did not finish")
    tails = ["\n".join(line for line in err.splitlines() if not line.lstrip().startswith("["))[-3000:]
             for _, err in finished]
    assert [p.returncode for p in procs] == [0, 0], "\n---- next worker ----\n".join(tails)
    outputs = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
               for out, _ in finished]

    chief, worker = outputs
    for out in outputs:
        assert out["hardware"]["kind"] == "multi-worker" and out["hardware"]["replicas"] == 2
        assert out["epochs"] == 1
    assert chief["hardware"]["worker"] == "chief" and worker["hardware"]["worker"] == "worker-1"
    # synchronous all-reduce: both workers end with the same weights
    assert chief["weights_sum"] == pytest.approx(worker["weights_sum"], rel=1e-5)
    # only the chief records the run; the global batch is the per-replica batch times the replicas
    assert chief["run_id"] and not worker["run_id"]
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(chief["run_id"])
    assert run.data.params["global_batch_size"] == "16" and run.data.tags["hardware"] == "multi-worker"
    exp = client.get_experiment_by_name(settings.experiment_name)
    assert len(client.search_runs([exp.experiment_id])) == 1
