"""The pseudonymisation salt: never empty or short, one per machine, created whole, private."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

import pytest

from pipeline.data.deid import MIN_SALT_BYTES, SALT_FILE, load_salt, pseudonymise
from pipeline.errors import SaltError, XrayopsError

ENV = "XRAYOPS_TEST_ONLY_SALT"  # a variable nobody sets, so the file path is exercised


@pytest.fixture(autouse=True)
def _no_env_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)


def salt_file(home: Path) -> Path:
    return home / "secrets" / SALT_FILE


def test_a_created_salt_is_long_private_stable_and_leaves_no_temp_file(tmp_path: Path) -> None:
    salt = load_salt(ENV, tmp_path)
    assert len(salt) >= MIN_SALT_BYTES
    assert stat.S_IMODE(salt_file(tmp_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(salt_file(tmp_path).parent.stat().st_mode) == 0o700
    assert load_salt(ENV, tmp_path) == salt
    assert [p.name for p in salt_file(tmp_path).parent.iterdir()] == [SALT_FILE]


@pytest.mark.parametrize("content", ["", "\n", "a" * (MIN_SALT_BYTES - 1)], ids=["empty", "newline", "short"])
def test_an_empty_or_short_salt_file_is_refused_with_the_fix(tmp_path: Path, content: str) -> None:
    salt_file(tmp_path).parent.mkdir(parents=True)
    salt_file(tmp_path).write_text(content)
    with pytest.raises(XrayopsError) as err:  # before: b"" came back, and every pseudonym was HMAC(b"", id)
        load_salt(ENV, tmp_path)
    assert isinstance(err.value, SaltError)
    assert str(salt_file(tmp_path)) in str(err.value) and f"at least {MIN_SALT_BYTES}" in str(err.value)
    assert "delete it" in err.value.hint and ENV in err.value.hint
    assert salt_file(tmp_path).read_text() == content  # never silently replaced: existing pseudonyms depend on it


@pytest.mark.parametrize("value", ["", "test-salt-not-secret", "x" * (MIN_SALT_BYTES - 1)])
def test_an_empty_or_short_salt_in_the_environment_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              value: str) -> None:
    monkeypatch.setenv(ENV, value)
    with pytest.raises(SaltError, match=rf"\${ENV} .*at least {MIN_SALT_BYTES}") as err:
        load_salt(ENV, tmp_path)
    assert "secrets.token_hex" in err.value.hint
    assert not salt_file(tmp_path).exists()  # no silent fallback to a local salt


def test_a_long_enough_environment_salt_is_used_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "s" * MIN_SALT_BYTES)
    assert load_salt(ENV, tmp_path) == b"s" * MIN_SALT_BYTES
    assert pseudonymise("1234567", load_salt(ENV, tmp_path)) != pseudonymise("1234567", b"")


def test_the_test_suite_salt_is_long_enough() -> None:
    import os

    assert len(os.environ["XRAYOPS_PSEUDONYM_SALT"].encode()) >= MIN_SALT_BYTES  # tests/conftest.py


def _load_in_child(home: str, start: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    start.wait()
    try:
        results.put(("ok", load_salt(ENV, Path(home)).decode()))
    except Exception as exc:  # noqa: BLE001 - the test reports whatever a process died of
        results.put(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
def test_eight_processes_creating_the_salt_at_once_share_one_and_none_crashes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # cheap starts, so all eight race on the same instant
    for round_ in range(10):
        home = tmp_path / f"home{round_}"
        start, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_load_in_child, args=(str(home), start, results)) for _ in range(8)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        # before: a loser crashed on O_EXCL (FileExistsError) or read the winner's still-empty file
        assert all(status == "ok" for status, _ in got), got
        salts = {salt for _, salt in got}
        assert len(salts) == 1 and len(salts.pop()) >= MIN_SALT_BYTES
        assert [p.name for p in salt_file(home).parent.iterdir()] == [SALT_FILE]
        assert stat.S_IMODE(salt_file(home).stat().st_mode) == 0o600
