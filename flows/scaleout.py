"""Scale-out of the per-file data work (read, hash, decode, feature extraction) on Dask.

With ``orchestrate.dask_address`` set, the ingest task hands its per-file work to a
:class:`prefect_dask.DaskTaskRunner` in shards: each shard is a Prefect task run
(``ingest-shard``, visible in the UI) executed on a Dask worker, and the results stream
back in input order to the ingest task, which writes the manifest as usual.

- ``dask_address: null`` — no Dask; local worker processes or threads (``data.ingest.workers``,
  ``data.ingest.executor``);
- ``dask_address: local`` — a throw-away in-process cluster of ``data.ingest.workers``
  single-thread workers (file decoding releases the GIL), handy to try the path;
- ``dask_address: tcp://scheduler:8786`` — an existing cluster (``dask scheduler`` +
  ``dask worker`` on other machines). Workers must see the raw data and the dataset
  folder at the same paths (shared volume), and receive the pseudonymisation salt with
  each shard: run them inside the trusted network only.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.config import Settings

MIN_SHARD, MAX_SHARD = 8, 512
SHARDS_PER_WORKER = 4
MAX_IN_FLIGHT = 16


@task(name="ingest-shard", cache_policy=NO_CACHE, retries=1)
def read_shard(read: Callable[[Any], Any], records: list[Any]) -> list[Any]:
    """Run the per-file ingest work on one shard of records (on a Dask worker)."""
    return [read(record) for record in records]


def local_workers(settings: Settings) -> int:
    from pipeline.data.parallel import cpu_count

    return settings.data.ingest.workers or cpu_count()


def dask_task_runner(settings: Settings) -> Any:
    """The DaskTaskRunner for ``orchestrate.dask_address`` (``local`` = an in-process cluster)."""
    from prefect_dask import DaskTaskRunner

    address = settings.orchestrate.dask_address
    if not address:
        raise ValueError("orchestrate.dask_address is not set")
    if address == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": local_workers(settings), "threads_per_worker": 1,
                                              "processes": False, "dashboard_address": None})
    return DaskTaskRunner(address=address)


def shard_size(n_records: int, n_workers: int) -> int:
    """Records per shard: about SHARDS_PER_WORKER shards per worker, within [MIN_SHARD, MAX_SHARD]."""
    return max(MIN_SHARD, min(MAX_SHARD, math.ceil(n_records / max(1, n_workers * SHARDS_PER_WORKER))))


def map_on_runner(runner: Any, n_workers: int, read: Callable[[Any], Any], records: Iterable[Any]) -> Iterator[Any]:
    """Submit shards of ``records`` to ``runner``; yield outcomes in input order (bounded in flight)."""
    items = list(records)
    size = shard_size(len(items), n_workers)
    pending: deque[Any] = deque()
    for start in range(0, len(items), size):
        pending.append(runner.submit(read_shard, {"read": read, "records": items[start:start + size]}))
        if len(pending) >= MAX_IN_FLIGHT:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def _cluster_workers(runner: Any, default: int) -> int:
    client = getattr(runner, "_client", None)
    try:
        return max(1, len(client.scheduler_info()["workers"])) if client else default
    except Exception:  # noqa: BLE001 - an old/odd client: fall back to the configured count
        return default


@contextmanager
def ingest_mapper(settings: Settings) -> Iterator[Callable[..., Iterable[Any]] | None]:
    """A ``mapper`` for :func:`pipeline.data.ingest.run_ingest`, or None when Dask is not configured."""
    if not settings.orchestrate.dask_address:
        yield None
        return
    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with dask_task_runner(settings) as runner:
        yield partial(map_on_runner, runner, _cluster_workers(runner, local_workers(settings)))
