"""The registry's alias lock: across processes, its timeout, and the Prefect limit for shared servers."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, with_overrides
from pipeline.errors import ConfigError, RegistryBusy, RegistryError
from pipeline.registry.contract import CHAMPION, PREVIOUS, VersionRecord
from pipeline.registry.lock import alias_lock, lock_path, registry_file_lock, shared_registry
from pipeline.registry.read import aliases, get_alias, get_version
from pipeline.registry.write import move_champion
from tests.registry.versions import gate_against_current, new_version


def test_a_held_lock_makes_an_alias_move_wait_then_fail_naming_the_holder(registry: Settings) -> None:
    settings = with_overrides(registry, ["promote.registry_lock_timeout_s=0.3"])
    v1 = new_version(settings)
    assert lock_path(settings).parent == settings.home / "locks"  # the SQLite registry lives in paths.home
    with registry_file_lock(settings), pytest.raises(RegistryBusy, match=r"held by another writer \(pid \d+"):
        move_champion(settings, v1.version, reason="blocked")
    assert get_alias(settings, CHAMPION) is None
    move_champion(settings, v1.version, reason="free again")
    assert aliases(settings)[CHAMPION] == str(v1.version)


# (tracking URI, registry URI, shared?) with {tmp} = a temporary folder; None = the default
REGISTRIES = [
    (None, None, False),  # the default: SQLite in paths.home
    ("sqlite:///{tmp}/mlflow.db", None, False),
    ("file://{tmp}/mlruns", None, False),
    ("{tmp}/mlruns", None, False),
    ("http://mlflow:5000", None, True),
    ("https://alice:s3cret@mlflow.example.org", None, True),
    ("postgresql://alice:s3cret@db.example.org/mlflow", None, True),
    ("mysql+pymysql://db.example.org/mlflow", None, True),
    (None, "http://mlflow:5000", True),  # local tracking, shared registry
    ("http://mlflow:5000", "sqlite:///{tmp}/registry.db", False),  # shared tracking, local registry
]


@pytest.mark.parametrize(("tracking", "registry_uri", "shared"), REGISTRIES)
def test_alias_moves_on_a_shared_registry_need_the_prefect_limit(
        make_settings: Callable[..., Settings], tmp_path: Path, tracking: str | None, registry_uri: str | None,
        shared: bool) -> None:
    """Before: a registry server without promote.registry_write_limit only logged a warning, and moves on two
    machines each took their own file lock. Now the move is refused, naming the setting to set."""
    from flows.registry_lock import registry_write_lock

    sets = [f"paths.mlflow_tracking_uri={tracking.format(tmp=tmp_path)}"] if tracking else []
    sets += [f"paths.mlflow_registry_uri={registry_uri.format(tmp=tmp_path)}"] if registry_uri else []
    settings = make_settings(*sets, "promote.registered_model=xr-shared")
    assert shared_registry(settings) is shared, settings.registry_uri
    if not shared:  # the file lock alone, as before
        assert registry_write_lock(settings) is None
        with alias_lock(settings):
            pass
        return
    with pytest.raises(ConfigError, match="is shared .* promote.registry_write_limit is null") as err:
        with alias_lock(settings):
            pytest.fail("a shared registry's aliases were writable without the Prefect limit")
    assert "s3cret" not in str(err.value)
    assert err.value.hint is not None and "promote.registry_write_limit: registry-write" in err.value.hint
    assert "prefect gcl create registry-write --limit 1" in err.value.hint
    with pytest.raises(ConfigError, match="promote.registry_write_limit is null"):
        registry_write_lock(settings)  # the flows refuse before the gate runs
    taken: list[str] = []
    with alias_lock(settings, lambda: nullcontext(taken.append("outer"))):  # an outer lock: the move may go on
        taken.append("file")
    assert taken == ["outer", "file"]
    limited = with_overrides(settings, ["promote.registry_write_limit=registry-write"])
    assert registry_write_lock(limited) is not None


def _promote_in_process(params: str, model: str, version: str, attempts: int, barrier: Any, results: Any) -> None:
    """One promotion in its own process: gate against the champion of the moment, wait for the others,
    then conclude (re-gating when another process moved the champion first)."""
    from pipeline.config import load_settings
    from pipeline.registry import write
    from pipeline.registry.promote import conclude

    write.publish_card = lambda settings, version: None  # type: ignore[assignment] - no evaluation to card
    settings = with_overrides(load_settings(params), [f"promote.registered_model={model}"])
    mv = get_version(settings, version)
    try:
        decision = gate_against_current(settings, mv)
        barrier.wait(180)
        moved = conclude(settings, mv, decision, attempts=attempts,
                         regate=lambda: gate_against_current(settings, mv))
        results.put((version, "ok", moved))
    except BaseException as exc:  # noqa: BLE001 - sent to the test process
        results.put((version, "error", repr(exc)))


@pytest.mark.slow
def test_promotions_racing_in_processes_keep_the_chain(registry: Settings) -> None:
    """Eight processes promote at once: every one ends as a link of the previous-champion chain, each
    gated against the champion it replaced (the file lock excludes processes, not only threads)."""
    v0 = new_version(registry)
    move_champion(registry, v0.version, reason="first")
    racers = [str(new_version(registry).version) for _ in range(8)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(racers)), ctx.Queue()
    procs = [ctx.Process(target=_promote_in_process, args=(str(registry.root / "params.yaml"),
                                                           registry.registered_model, v, len(racers), barrier,
                                                           results)) for v in racers]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(status == "ok" for _, status, _ in outcomes), outcomes

    links, version = [], str(get_alias(registry, CHAMPION).version)
    while version is not None:
        record = VersionRecord.from_version(get_version(registry, version))
        links.append(record)
        version = record.champion.previous_version
    assert sorted(int(r.version) for r in links) == sorted(int(v) for v in [str(v0.version), *racers])
    for newer, older in zip(links, links[1:], strict=False):
        assert newer.gate is not None and newer.gate.champion == older.version == newer.champion.previous_version
    assert aliases(registry)[PREVIOUS] == links[1].version


@pytest.mark.slow
def test_the_flows_take_the_prefect_limit_named_by_registry_write_limit(prefect_harness: None,
                                                                        registry: Settings) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.registry_lock import registry_write_lock

    name = f"registry-write-{uuid.uuid4().hex[:6]}"
    settings = with_overrides(registry, [f"promote.registry_write_limit={name}",
                                         "promote.registry_lock_timeout_s=1"])
    v1 = new_version(settings)
    lock = registry_write_lock(settings)
    assert lock is not None
    with pytest.raises(RegistryError, match=f"concurrency limit '{name}'") as err:
        move_champion(settings, v1.version, reason="no limit yet", lock=lock)
    assert f"prefect gcl create {name} --limit 1" in str(err.value.hint)
    assert get_alias(settings, CHAMPION) is None  # nothing moved without the lock

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(RegistryBusy, match=name):  # another machine's move holds the slot
            move_champion(settings, v1.version, reason="slot taken", lock=lock)
    finally:
        release.set()
        holder.join(30)
    moved = move_champion(settings, v1.version, reason="slot free", lock=lock)
    assert moved["champion"] == str(v1.version) == aliases(settings)[CHAMPION]

    # the CLI takes the same limit: a reviewer's approval on another machine waits for the slot too
    from typer.testing import CliRunner

    from pipeline.cli import app

    v2 = new_version(settings, gated_against=str(v1.version))
    cli = ["registry", "approve", str(v2.version), "--reviewer", "dr-lock",
           "--params", str(settings.root / "params.yaml"),
           "--set", f"promote.registered_model={settings.registered_model}",
           "--set", f"promote.registry_write_limit={name}", "--set", "promote.registry_lock_timeout_s=1"]
    release.clear()
    holder = threading.Thread(target=hold)
    held.clear()
    holder.start()
    try:
        assert held.wait(30)
        busy = CliRunner().invoke(app, cli)
        assert busy.exit_code == 2 and name in busy.output, busy.output
    finally:
        release.set()
        holder.join(30)
    assert aliases(settings)[CHAMPION] == str(v1.version)
    approved = CliRunner().invoke(app, cli)
    assert approved.exit_code == 0, approved.output
    assert aliases(settings)[CHAMPION] == str(v2.version)


def test_promotion_and_approval_on_a_shared_registry_without_the_limit_are_refused_before_any_write(
        make_settings: Callable[..., Settings]) -> None:
    """Refused up front, not at the alias move after registering and gating (or after recording an approval):
    the registry URI names no running server, so any registry call would fail with a connection error instead."""
    from pipeline.registry.promote import approve_version, promote_challenger

    settings = make_settings("paths.mlflow_tracking_uri=http://127.0.0.1:9", "promote.registered_model=xr-shared")
    with pytest.raises(ConfigError, match="promote.registry_write_limit is null"):
        promote_challenger(settings, trained=None, evaluation=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="promote.registry_write_limit is null"):
        approve_version(settings, "1", reviewer="Dr. R", comment="ok", approve=True)
