"""Registry integrity under faults and races, on a real temporary MLflow registry (SQLite).

No model is trained here: versions are registered with hand-written gate tags, which is all
that alias moves, approval and rollback read. Faults are injected at the edge only: the
``MlflowClient`` method that talks to the store raises an ``MlflowException`` with a server
error code, as a 5xx answer, a timeout or a locked SQLite database does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import Settings
from pipeline.errors import PromotionError, RegistryError
from pipeline.registry.contract import CHAMPION, PREVIOUS, VersionRecord
from pipeline.registry.read import aliases, get_alias, get_version
from pipeline.registry.write import move_champion, rollback
from tests.registry.versions import gate_against_current, gate_as, new_version


def server_error(method: str = "") -> MlflowException:
    return MlflowException(f"INTERNAL_ERROR: {method} failed (injected 5xx)", error_code="INTERNAL_ERROR")


@contextmanager
def failing(monkeypatch: pytest.MonkeyPatch, method: str, when: Callable[..., bool] = lambda *a, **k: True,
            ) -> Iterator[list[tuple[Any, ...]]]:
    """Make ``MlflowClient.<method>`` raise a server error whenever ``when(*args)`` is true."""
    real = getattr(MlflowClient, method)
    calls: list[tuple[Any, ...]] = []

    def fake(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            calls.append(args)
            raise server_error(method)
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, method, fake)
        yield calls


# --------------------------------------------------------------------------- (1) read errors are not "no champion"


def test_missing_alias_and_missing_model_read_as_none(registry: Settings) -> None:
    from pipeline.config import with_overrides

    assert get_alias(registry, CHAMPION) is None
    assert aliases(registry) == {}
    other = with_overrides(registry, ["promote.registered_model=never-registered"])
    assert get_alias(other, CHAMPION) is None and aliases(other) == {}


def test_a_registry_error_on_an_alias_read_is_an_error_not_no_champion(registry: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = new_version(registry)
    move_champion(registry, v1.version, reason="first")
    with failing(monkeypatch, "get_model_version_by_alias") as calls, \
            pytest.raises(RegistryError, match="INTERNAL_ERROR") as err:
        get_alias(registry, CHAMPION)
    assert calls and "registry" in str(err.value).lower()
    assert err.value.hint
    with failing(monkeypatch, "get_registered_model"), pytest.raises(RegistryError, match="INTERNAL_ERROR"):
        aliases(registry)


def test_a_registry_error_while_reading_the_champion_leaves_the_chain_intact(registry: Settings,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the failed read meant "no champion", so ``previous-champion`` was not moved and a
    later rollback went to v1 instead of v2."""
    v1, v2 = new_version(registry), new_version(registry)
    move_champion(registry, v1.version, reason="first")
    gate_as(registry, v2.version, str(v1.version))
    move_champion(registry, v2.version, reason="second")
    v3 = new_version(registry, gated_against=str(v2.version))
    before = aliases(registry)

    with failing(monkeypatch, "get_model_version_by_alias", lambda name, alias: alias == CHAMPION), \
            pytest.raises(RegistryError, match="INTERNAL_ERROR"):
        move_champion(registry, v3.version, reason="third")

    assert aliases(registry) == before
    assert rollback(registry, reason="test", actor="t")["to_version"] == str(v1.version)


def test_a_failed_alias_write_between_the_two_moves_leaves_the_aliases_as_they_were(
        registry: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = new_version(registry)
    move_champion(registry, v1.version, reason="first")
    v2 = new_version(registry, gated_against=str(v1.version))
    move_champion(registry, v2.version, reason="second")
    v3 = new_version(registry, gated_against=str(v2.version))
    before = aliases(registry)

    with failing(monkeypatch, "set_registered_model_alias", lambda name, alias, version: alias == CHAMPION), \
            pytest.raises(RegistryError, match="INTERNAL_ERROR") as err:
        move_champion(registry, v3.version, reason="third")

    assert aliases(registry) == before, "previous-champion moved although champion did not"
    assert "unchanged" in str(err.value)


# --------------------------------------------------------------------------- (2) approval and alias rules


def test_a_version_gated_against_an_old_champion_cannot_be_approved(registry: Settings) -> None:
    from pipeline.config import with_overrides
    from pipeline.registry.promote import approve_version

    settings = with_overrides(registry, ["promote.require_approval=true"])
    v1 = new_version(settings)
    approve_version(settings, str(v1.version), reviewer="r", comment="", approve=True)
    v2 = new_version(settings, gated_against=str(v1.version))  # waits for a reviewer
    v3 = new_version(settings, gated_against=str(v1.version))
    approve_version(settings, str(v3.version), reviewer="r", comment="", approve=True)
    assert aliases(settings)[CHAMPION] == str(v3.version)

    with pytest.raises(PromotionError, match=rf"gated against v{v1.version}.*champion is v{v3.version}"):
        approve_version(settings, str(v2.version), reviewer="r", comment="late", approve=True)
    assert aliases(settings)[CHAMPION] == str(v3.version)
    assert aliases(settings)[PREVIOUS] == str(v1.version)


def test_a_rolled_back_version_cannot_be_approved_or_made_champion_again(registry: Settings) -> None:
    from pipeline.config import with_overrides
    from pipeline.registry.promote import approve_version

    settings = with_overrides(registry, ["promote.require_approval=true"])
    v1 = new_version(settings)
    approve_version(settings, str(v1.version), reviewer="r", comment="", approve=True)
    v2 = new_version(settings, gated_against=str(v1.version))
    approve_version(settings, str(v2.version), reviewer="r", comment="", approve=True)
    rollback(settings, reason="bad in production", actor="ops")
    assert aliases(settings)[CHAMPION] == str(v1.version)

    gate_as(settings, v2.version, str(v1.version))  # even re-gated against the current champion
    with pytest.raises(PromotionError, match="rolled back"):
        approve_version(settings, str(v2.version), reviewer="r", comment="again", approve=True)
    with pytest.raises(PromotionError, match="rolled back"):
        move_champion(settings, v2.version, reason="forced")
    assert aliases(settings)[CHAMPION] == str(v1.version)


def test_a_failed_version_cannot_be_approved(registry: Settings) -> None:
    from pipeline.registry.promote import approve_version

    v1 = new_version(registry, verdict="fail")
    with pytest.raises(PromotionError, match="did not pass the promotion gate"):
        approve_version(registry, str(v1.version), reviewer="r", comment="", approve=True)
    assert get_alias(registry, CHAMPION) is None


# --------------------------------------------------------------------------- (3) rollback under faults


def champions(settings: Settings, n: int) -> list[Any]:
    """``n`` versions made champion one after the other, each gated against its predecessor."""
    versions: list[Any] = []
    for _ in range(n):
        v = new_version(settings, gated_against=str(versions[-1].version) if versions else None)
        move_champion(settings, v.version, reason="test",
                      expected_champion=str(versions[-1].version) if versions else None)
        versions.append(v)
    return versions


def is_key(key: str) -> Callable[..., bool]:
    return lambda name, version, k, value: k == key


# (id, MlflowClient method, when it fails, chain length, is the champion marked rolled back after the error)
ROLLBACK_FAULTS = [
    ("first-rollback-tag", "set_model_version_tag", is_key("rolled_back_reason"), 3, False),
    ("rollback-marker", "set_model_version_tag", is_key("rolled_back_at"), 3, False),
    ("restored-champion-tag", "set_model_version_tag", is_key("champion_since"), 3, True),
    ("audit-artifact", "log_dict", lambda *a, **k: True, 3, True),
    ("champion-alias", "set_registered_model_alias", lambda name, alias, v: alias == CHAMPION, 3, True),
    ("previous-alias", "set_registered_model_alias", lambda name, alias, v: alias == PREVIOUS, 3, True),
    ("previous-alias-delete", "delete_registered_model_alias", lambda name, alias: alias == PREVIOUS, 2, True),
]


@pytest.mark.parametrize(("method", "when", "n", "marked"), [pytest.param(*f[1:], id=f[0]) for f in ROLLBACK_FAULTS])
def test_a_registry_error_at_any_write_of_a_rollback_fails_closed(
        registry: Settings, monkeypatch: pytest.MonkeyPatch, method: str, when: Callable[..., bool], n: int,
        marked: bool) -> None:
    """Before: the rollback tags were written after the aliases moved, unwrapped: an error there was a raw
    MlflowException traceback and left the rolled-back version untagged, so it could be approved again.
    Now the bad version is marked before any alias moves; every error is one RegistryUnavailable that
    says the aliases are unchanged, the chain is intact, and a marked version cannot come back."""
    from pipeline.errors import RegistryUnavailable
    from pipeline.registry.promote import approve_version

    versions = champions(registry, n)
    bad = str(versions[-1].version)
    before, links = aliases(registry), [r.version for r in chain(registry)]

    with failing(monkeypatch, method, when) as calls, pytest.raises(RegistryUnavailable) as err:
        rollback(registry, reason="bad in production", actor="ops")
    assert calls, f"{method} was never called"
    assert "INTERNAL_ERROR" in str(err.value) and "aliases are unchanged" in str(err.value), str(err.value)
    assert err.value.hint and "xrayops registry" in err.value.hint
    assert aliases(registry) == before and [r.version for r in chain(registry)] == links

    assert (VersionRecord.from_version(get_version(registry, bad)).rollback is not None) is marked
    if marked:
        with pytest.raises(PromotionError, match="rolled back"):
            approve_version(registry, bad, reviewer="r", comment="again", approve=True)
        with pytest.raises(PromotionError, match="rolled back"):
            move_champion(registry, bad, reason="forced")

    done = rollback(registry, reason="bad in production", actor="ops")  # the retry completes
    assert done["from_version"] == bad and aliases(registry)[CHAMPION] == str(versions[-2].version)
    assert aliases(registry).get(PREVIOUS) == (str(versions[-3].version) if n >= 3 else None)
    assert VersionRecord.from_version(get_version(registry, bad)).rollback is not None
    with pytest.raises(PromotionError, match="rolled back"):
        approve_version(registry, bad, reviewer="r", comment="again", approve=True)


def test_a_failed_description_line_does_not_undo_a_complete_rollback(
        registry: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    versions = champions(registry, 2)
    with failing(monkeypatch, "update_model_version") as calls:
        done = rollback(registry, reason="bad", actor="ops")
    assert calls and done["aliases"] == {CHAMPION: str(versions[0].version)}
    assert "could not add its line" in caplog.text
    record = VersionRecord.from_version(get_version(registry, versions[1].version))
    assert record.rollback is not None and record.rollback.by == "ops"


def test_the_cli_reports_a_registry_error_during_rollback_in_one_line(
        registry: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.test_cli_errors import error_lines

    champions(registry, 2)
    before = aliases(registry)
    argv = ["registry", "rollback", "--reason", "bad", "--params", str(registry.root / "params.yaml"),
            "--set", f"promote.registered_model={registry.registered_model}"]
    with failing(monkeypatch, "set_model_version_tag", is_key("rolled_back_at")):
        out = CliRunner().invoke(app, argv)
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    error, hint = error_lines(out.output)
    assert "failed to mark v2 as rolled back" in error and "aliases are unchanged" in error, error
    assert hint is not None and "xrayops registry" in hint
    assert aliases(registry) == before


# --------------------------------------------------------------------------- races


def chain(settings: Settings) -> list[VersionRecord]:
    """Champion, then each version it replaced, following ``previous_champion_version`` tags."""
    out: list[VersionRecord] = []
    current = get_alias(settings, CHAMPION)
    version = str(current.version) if current is not None else None
    while version is not None and len(out) < 50:
        record = VersionRecord.from_version(get_version(settings, version))
        out.append(record)
        version = record.champion.previous_version
    return out


@pytest.mark.slow
def test_racing_alias_moves_keep_the_previous_champion_chain(registry: Settings) -> None:
    """Eight promotions race (threads, all gated at once against v0, then released together):
    every version that became champion is one link of the chain, each gated against its predecessor."""
    from pipeline.registry.promote import conclude

    v0 = new_version(registry)
    move_champion(registry, v0.version, reason="first")
    racers = [new_version(registry, gated_against=str(v0.version)) for _ in range(8)]
    start = threading.Barrier(len(racers))
    errors: list[BaseException] = []

    def race(version: Any) -> None:
        try:
            decision = gate_against_current(registry, version)
            start.wait(30)
            conclude(registry, version, decision, regate=lambda: gate_against_current(registry, version),
                     attempts=len(racers))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(v,)) for v in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors

    links = chain(registry)
    assert sorted(int(r.version) for r in links) == sorted(int(v.version) for v in [v0, *racers])
    for newer, older in zip(links, links[1:], strict=False):
        assert newer.champion.previous_version == older.version
        assert newer.gate is not None and newer.gate.champion == older.version, (newer.version, newer.gate)
    now = aliases(registry)
    assert now[CHAMPION] == links[0].version and now[PREVIOUS] == links[1].version


@pytest.mark.slow
def test_simultaneous_moves_of_versions_gated_against_the_same_champion_let_one_through(registry: Settings) -> None:
    """Eight direct alias moves at once, all gated against v0: one wins, the others are refused as
    stale (their gate compared them with a champion that is gone); the chain has no lost link."""
    v0 = new_version(registry)
    move_champion(registry, v0.version, reason="first")
    racers = [new_version(registry, gated_against=str(v0.version)) for _ in range(8)]
    start = threading.Barrier(len(racers))
    outcomes: dict[str, BaseException | None] = {}

    def race(version: Any) -> None:
        start.wait(30)
        try:
            move_champion(registry, version.version, reason="race", expected_champion=str(v0.version))
            outcomes[str(version.version)] = None
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcomes[str(version.version)] = exc

    threads = [threading.Thread(target=race, args=(v,)) for v in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winners = [v for v, exc in outcomes.items() if exc is None]
    assert len(winners) == 1, outcomes
    assert all(isinstance(exc, PromotionError) and "gated against" in str(exc)
               for exc in outcomes.values() if exc is not None), outcomes
    links = chain(registry)
    assert [r.version for r in links] == [winners[0], str(v0.version)]
    assert aliases(registry)[PREVIOUS] == str(v0.version)


def test_a_registry_error_reading_a_version_is_not_no_such_version(registry: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import RegistryUnavailable

    v1 = new_version(registry)
    with pytest.raises(RegistryError, match="has no version 99"):
        get_version(registry, 99)
    with failing(monkeypatch, "get_model_version"), pytest.raises(RegistryUnavailable, match="INTERNAL_ERROR"):
        get_version(registry, v1.version)
