"""Map a function over a stream in input order on local cores: worker processes or threads.

Ingestion is CPU-bound per file (decode, hash, features). Threads share one interpreter
lock, and the per-image feature code makes many short NumPy/Pillow calls, so two threads
do not reach two cores' worth of work; worker processes do. Processes cost a start (the
fork server imports NumPy and Pillow once, ~0.2 s), so:

- ``process``: chunks of items go to a pool of worker processes (the ``forkserver``
  start method: safe in a multi-threaded parent such as a Prefect flow run, unlike
  ``fork``). The pool starts on a helper thread; until its workers are up, the calling
  thread works through chunks itself, so the start costs little wall time.
- ``auto`` (the default): as ``process`` for inputs of more than ``PROCESS_AFTER`` items
  (known from ``len()``, or counted as a stream goes by); smaller inputs (tests, a few
  uploads) stay in the calling process.
- ``thread``: a thread pool (for functions or items that cannot be pickled).

Worker processes tune their allocators for this load (one thread allocating and freeing
the same few image-sized buffers): glibc keeps such buffers on its heap instead of
mapping and unmapping them for every image, and Pillow keeps a few freed image blocks
for reuse (without these settings a worker took ~20 % longer per 512x512 PNG here).
The calling process is left untouched.

Results come back in input order (downstream deduplication and the manifest are
deterministic), and at most ``2 x workers`` chunks are in flight, so memory stays flat in
the length of the stream. An exception raised by ``fn`` is re-raised in the caller.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("auto", "process", "thread")
CHUNK = 16
PROCESS_AFTER = 64
# imported once by the fork server, before it forks workers (set before the server starts)
WORKER_PRELOAD = ["pipeline.data.reader"]


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int = 0, executor: str = "auto",
                chunk: int = CHUNK, process_after: int = PROCESS_AFTER) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` cores (0 = all), yielding results in input order.

    With ``process``/``auto``, ``fn`` and the items must pickle (a module-level function or a
    ``functools.partial`` of one).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    workers = workers or cpu_count()
    if workers == 1:
        yield from map(fn, items)
    elif executor == "thread":
        yield from _threads(fn, items, workers)
    else:
        yield from _processes(fn, items, workers, chunk, 0 if executor == "process" else process_after)


def _threads(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= workers * 4:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _apply(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def _ready() -> int:
    return os.getpid()


def _done(result: list[R]) -> Future[list[R]]:
    future: Future[list[R]] = Future()
    future.set_result(result)
    return future


def _processes(fn: Callable[[T], R], items: Iterable[T], workers: int, chunk: int,
               process_after: int) -> Iterator[R]:
    """``process_after == 0`` (executor ``process``): every chunk goes to the workers (started
    first); else chunks run here until the input proves large and the workers are up."""
    big = isinstance(items, Sized) and len(items) > process_after
    stream = iter(items)
    seen = 0
    starter: ThreadPoolExecutor | None = None
    starting: Future[ProcessPoolExecutor] | None = None
    pool: ProcessPoolExecutor | None = _start_pool_now(workers) if process_after == 0 else None
    settled = pool is not None  # where chunks run is decided (workers up, or none could start)
    pending: deque[Future[list[R]]] = deque()
    try:
        while batch := list(islice(stream, chunk)):
            seen += len(batch)
            if not settled and starting is None and (big or seen > process_after):
                starter = ThreadPoolExecutor(1, thread_name_prefix="ingest-pool-start")
                starting = starter.submit(_start_pool, workers)
            if not settled and starting is not None and starting.done():
                pool, settled = _started(starting), True
            if pool is not None:
                pending.append(pool.submit(_apply, fn, batch))
            else:  # no workers (yet): small input, still starting, or none could start
                pending.append(_done(_apply(fn, batch)))
            while pending and (len(pending) > 2 * workers or pending[0].done()):
                yield from _result(pending.popleft())
        while pending:
            yield from _result(pending.popleft())
    finally:
        if starter is not None:
            starter.shutdown(wait=True)
            if not settled and starting is not None:
                pool = _started(starting)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _started(starting: Future[ProcessPoolExecutor]) -> ProcessPoolExecutor | None:
    """The started pool, or None (logged) when worker processes cannot start here."""
    exc = starting.exception()
    if exc is None:
        return starting.result()
    logger.warning("could not start worker processes (%s: %s); reading files in this process instead",
                   type(exc).__name__, exc)
    return None


def _start_pool_now(workers: int) -> ProcessPoolExecutor:
    """Executor ``process``: the workers must start; if they cannot, say so and what to use instead."""
    try:
        return _start_pool(workers)
    except (OSError, BrokenProcessPool, RuntimeError) as exc:
        raise RuntimeError(
            f"could not start ingestion worker processes ({type(exc).__name__}: {exc}); set "
            "data.ingest.executor=auto (falls back to this process) or thread"
        ) from exc


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool with all its workers spawned (one no-op task per worker spawns it) and
    the fork server ready (their results came back)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload(WORKER_PRELOAD)  # no-op once this process's fork server runs
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_tune_worker)
    for future in [pool.submit(_ready) for _ in range(workers)]:  # one per worker: starts them all
        future.result()
    return pool


def _tune_worker() -> None:
    """Allocator settings of a worker process (see the module docstring); best effort."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: buffers under 32 MiB come from the heap
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MiB of free heap for reuse
    except (OSError, AttributeError):  # not glibc
        pass
    from PIL import Image

    Image.core.set_blocks_max(4)


def _result(future: Future[list[R]]) -> list[R]:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "an ingestion worker process died (killed for memory, or a decoder crashed on a file); "
            "rerun with data.ingest.executor=thread to find the file, or give the machine more memory"
        ) from exc
