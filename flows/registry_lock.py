"""The Prefect side of the registry's alias lock: a global concurrency limit for shared servers.

The library serialises alias moves with a file lock (``pipeline/registry/lock.py``), which
covers the processes of one machine. When several machines (workers) write to one MLflow
registry server, ``promote.registry_write_limit`` names a Prefect global concurrency limit
(create it once: ``prefect gcl create registry-write --limit 1``) that the flows take around
every alias move as well. It must exist: a missing limit is an error, never "no lock". A shared
registry (a server or database, not a local SQLite file) without the setting is refused before
the gate runs (:func:`pipeline.registry.lock.check_shared_lock`): no alias moves without a shared lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from pipeline.config import Settings
from pipeline.errors import RegistryBusy, RegistryError
from pipeline.registry.lock import AliasLock, check_shared_lock


def registry_write_lock(settings: Settings) -> AliasLock | None:
    """The lock the flows add around alias moves: the limit ``promote.registry_write_limit``, or None
    (the library's file lock only, for a local SQLite/file registry).

    Raises:
        ConfigError: the registry is shared (a server or database) and the setting is null.
    """
    name = settings.promote.registry_write_limit
    if not name:
        check_shared_lock(settings, None)
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

