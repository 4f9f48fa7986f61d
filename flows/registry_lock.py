"""The Prefect side of the registry's alias lock: a global concurrency limit for shared servers.

The library serialises alias moves with a file lock (``pipeline/registry/lock.py``), which
covers the processes of one machine. When several machines (workers) write to one MLflow
registry server, ``promote.registry_write_limit`` names a Prefect global concurrency limit
(create it once: ``prefect gcl create registry-write --limit 1``) that the flows take around
every alias move as well. It must exist: a missing limit is an error, never "no lock".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from pipeline.config import Settings
from pipeline.connections import mask_uri
from pipeline.errors import RegistryBusy, RegistryError
from pipeline.registry.lock import AliasLock


def registry_write_lock(settings: Settings) -> AliasLock | None:
    """The lock the flows add around alias moves: the limit ``promote.registry_write_limit``, or None
    (the library's file lock only; a warning when the registry is a server other machines may share)."""
    name = settings.promote.registry_write_limit
    if not name:
        if settings.registry_uri.startswith(("http://", "https://")):
            _logger().warning(
                "registry %s is a server but promote.registry_write_limit is null: alias moves are serialised on "
                "this machine only (set it and run `prefect gcl create registry-write --limit 1`)",
                mask_uri(settings.registry_uri))
        return None
    timeout = settings.promote.registry_lock_timeout_s

    @contextmanager
    def limit() -> Iterator[None]:
        from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
        from prefect.concurrency.sync import concurrency

        with ExitStack() as stack:
            try:
                stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout, strict=True))
            except ConcurrencySlotAcquisitionError as exc:
                raise RegistryError(f"the Prefect global concurrency limit {name!r} (promote.registry_write_limit) "
                                    f"could not be taken: {exc}",
                                    hint=f"create it: `prefect gcl create {name} --limit 1`, or set "
                                         "promote.registry_write_limit: null (file lock only)") from None
            except TimeoutError:
                raise RegistryBusy(f"the Prefect global concurrency limit {name!r} stayed taken for {timeout:g} s "
                                   "by another alias move",
                                   hint="wait for it to finish, or raise promote.registry_lock_timeout_s") from None
            yield

    return limit


def _logger() -> logging.Logger | logging.LoggerAdapter:  # type: ignore[type-arg]
    try:
        return get_run_logger()
    except MissingContextError:  # the CLI, outside a flow run
        return logging.getLogger(__name__)
