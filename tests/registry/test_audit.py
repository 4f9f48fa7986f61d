"""The audit log: registry and serving actions chained in order, tampering found, concurrent appends
kept, fail-closed registry moves. Real MLflow on a temporary SQLite registry; no model is trained
(versions carry hand-written gate tags, see tests/registry/versions.py)."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline import audit
from pipeline.audit import GENESIS, AuditLog, canonical, record_hash
from pipeline.cli import app
from pipeline.config import Settings, with_overrides
from pipeline.errors import AuditError
from pipeline.registry.contract import CHAMPION, PREVIOUS
from pipeline.registry.read import aliases
from pipeline.registry.write import move_champion, rollback
from tests.registry.audit_writer import append_many
from tests.registry.versions import gate_against_current, new_version


def actions(settings: Settings) -> list[tuple[str, str | None, str | None]]:
    """``(action, phase, version)`` of every record, in order."""
    return [(r["action"], r["details"].get("phase"), r["version"]) for r in AuditLog.of(settings).records()]


def verdict(settings: Settings) -> audit.Verdict:
    return AuditLog.of(settings).verify()


# --------------------------------------------------------------------------- registry actions, in order


@pytest.fixture
def reg(registry: Settings, tmp_path: Path) -> Settings:
    """The ``registry`` fixture (a new registered model) with an audit log of this test's own."""
    return with_overrides(registry, [f"paths.audit_log={tmp_path / 'audit' / 'audit.jsonl'}"])


def test_promotion_approval_and_rollback_are_chained_in_order(reg: Settings) -> None:
    from pipeline.registry.promote import approve_version

    settings = with_overrides(reg, ["promote.require_approval=true"])
    v1 = new_version(settings)
    gate_against_current(settings, v1)
    approve_version(settings, str(v1.version), reviewer="Dr. A", comment="card checked", approve=True)
    v2 = new_version(settings, gated_against=str(v1.version))
    gate_against_current(settings, v2)
    approve_version(settings, str(v2.version), reviewer="Dr. B", comment="subgroups fine", approve=True)
    rollback(settings, reason="alarms in production", actor="ops-on-call")
    v3 = new_version(settings, gated_against=str(v1.version))
    approve_version(settings, str(v3.version), reviewer="Dr. C", comment="not convinced", approve=False)

    a, b, c = str(v1.version), str(v2.version), str(v3.version)
    assert actions(settings) == [
        ("gate_decision", None, a), ("approval", None, a), ("alias_move", "intent", a), ("alias_move", "done", a),
        ("gate_decision", None, b), ("approval", None, b), ("alias_move", "intent", b), ("alias_move", "done", b),
        ("rollback", "intent", a), ("rollback", "done", a), ("approval", None, c)]
    records = AuditLog.of(settings).records()
    assert [r["actor"] for r in records if r["action"] in ("approval", "rollback")] == \
        ["Dr. A", "Dr. B", "ops-on-call", "ops-on-call", "Dr. C"]
    assert records[5]["details"] == {"status": "approved", "approved": True, "comment": "subgroups fine",
                                     "decided_at": records[5]["details"]["decided_at"]}
    assert records[7]["details"]["aliases"] == {PREVIOUS: a, CHAMPION: b}
    assert records[9]["details"] | {"before": None} == {
        "from_version": b, "to_version": a, "reason": "alarms in production", "phase": "done",
        "aliases": {CHAMPION: a, PREVIOUS: None}, "before": None}
    assert records[-1]["details"]["status"] == "rejected"
    assert records[4]["details"]["verdict"] == "pass" and records[4]["details"]["champion_version"] == a
    assert records[0]["model"] == settings.registered_model and "@" in records[0]["actor"]
    result = verdict(settings)
    assert result.ok and result.records == 11, result.summary()


def test_registration_records_the_version_and_its_challenger_alias(reg: Settings) -> None:
    from pipeline.evaluation.evaluate import EvalResult
    from pipeline.registry.write import register_version
    from pipeline.tracking import configure_mlflow, ensure_experiment
    from pipeline.training.train import TrainResult

    run = configure_mlflow(reg).create_run(ensure_experiment(reg))
    trained = TrainResult(run.info.run_id, "0", f"runs:/{run.info.run_id}/model", "tiny_cnn",
                          {"image_size": 32, "channels": 1}, ["normal", "pneumonia"], "pneumonia", {}, 1, 0.1, {},
                          {"name": "synthetic", "dvc_md5": "abc123"})
    evaluation = EvalResult("binary", {"auc": 0.9}, {"auc": [0.8, 0.95]}, None, [], 10)
    mv = register_version(reg, trained, evaluation)

    v = str(mv.version)
    assert actions(reg) == [("register", None, v), ("alias_move", "intent", v), ("alias_move", "done", v)]
    first = AuditLog.of(reg).records()[0]
    assert first["details"] == {"run_id": run.info.run_id, "source": f"runs:/{run.info.run_id}/model",
                                "model_arch": "tiny_cnn", "dataset": "synthetic", "dvc_md5": "abc123"}
    assert first["prev_hash"] == GENESIS and first["seq"] == 1
    assert AuditLog.of(reg).records()[2]["details"]["aliases"] == {"challenger": v}


def test_serving_start_and_stop_are_recorded(reg: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pipeline.serving import model_store
    from pipeline.serving.trust import TrustVerdict

    v1, v2 = new_version(reg), new_version(reg)
    holder = {"version": v1}
    monkeypatch.setattr(model_store, "check_alias", lambda settings, alias: TrustVerdict(None, "ok", holder["version"]))
    store = model_store.ModelStore(reg, loader=lambda s, v, alias: SimpleNamespace(
        version=str(v.version), model_name="m"))
    store.refresh()
    store.refresh()  # unchanged: nothing recorded
    holder["version"] = v2
    store.refresh()
    store.stop()
    a, b = str(v1.version), str(v2.version)
    records = AuditLog.of(reg).records()
    assert [(r["action"], r["version"]) for r in records] == [
        ("serving_start", a), ("serving_stop", a), ("serving_start", b), ("serving_stop", b)]
    assert records[2]["details"]["replaces"] == a and records[3]["details"]["why"] == "shutdown"


# --------------------------------------------------------------------------- fail closed


def test_an_unwritable_audit_log_stops_the_alias_move(reg: Settings, tmp_path: Path) -> None:
    v1 = new_version(reg)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the log's folder should be")
    settings = with_overrides(reg, [f"paths.audit_log={blocked / 'audit.jsonl'}"])
    with pytest.raises(AuditError, match="could not write the audit log"):
        move_champion(settings, v1.version, reason="first")
    assert aliases(settings) == {}, "the alias moved without an audit record"


def test_an_outcome_that_cannot_be_recorded_says_the_move_was_done(reg: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = new_version(reg)
    real = AuditLog.append

    def fail_on_done(self: AuditLog, action: str, **kw: Any) -> dict[str, Any]:
        if (kw.get("details") or {}).get("phase") == "done":
            raise AuditError("disk full (injected)")
        return real(self, action, **kw)

    monkeypatch.setattr(AuditLog, "append", fail_on_done)
    with pytest.raises(AuditError, match=r"was done, but its outcome could not be recorded.*disk full"):
        move_champion(reg, v1.version, reason="first")
    assert aliases(reg)[CHAMPION] == str(v1.version)
    assert actions(reg) == [("alias_move", "intent", str(v1.version))]


def test_refused_moves_write_nothing_and_failed_ones_are_recorded_as_failed(
        reg: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.errors import PromotionError, RegistryError

    v1 = new_version(reg)
    move_champion(reg, v1.version, reason="first")
    with pytest.raises(PromotionError):
        rollback(reg, reason="nothing to go back to", actor="ops")  # refused before any write: no record
    v2 = new_version(reg, gated_against="999")
    with pytest.raises(PromotionError):  # stale gate: refused under the lock, before the intent
        move_champion(reg, v2.version, reason="stale", expected_champion="999")
    assert [a for a, _, _ in actions(reg)] == ["alias_move", "alias_move"]

    v3 = new_version(reg, gated_against=str(v1.version))
    real = MlflowClient.set_registered_model_alias

    def fail_champion(self: MlflowClient, name: str, alias: str, version: Any) -> Any:
        if alias == CHAMPION:
            raise MlflowException("INTERNAL_ERROR: injected", error_code="INTERNAL_ERROR")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_champion)
    with pytest.raises(RegistryError):
        move_champion(reg, v3.version, reason="third")
    last = AuditLog.of(reg).records()[-1]
    assert (last["action"], last["details"]["phase"], last["version"]) == ("alias_move", "failed", str(v3.version))
    assert last["details"]["error"] == "RegistryUnavailable" and verdict(reg).ok


# --------------------------------------------------------------------------- tampering


def small_log(path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append("alias_move", model="m", version=i + 1, details={"aliases": {"champion": str(i + 1)}, "i": i})
    return log


def rewrite(path: Path, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"".join(line + b"\n" for line in edit(lines)))


def altered(lines: list[bytes]) -> list[bytes]:
    r = json.loads(lines[2])
    r["details"]["aliases"]["champion"] = "99"
    return [*lines[:2], canonical(r), *lines[3:]]


def forged(lines: list[bytes]) -> list[bytes]:
    """A new line with a correct hash of its own but linked to the wrong record."""
    r = json.loads(lines[3])
    r.update(seq=4, action="rollback", prev_hash=json.loads(lines[1])["hash"])
    r["hash"] = record_hash(r)
    return [*lines[:3], canonical(r), *lines[3:]]


def forged_linked(lines: list[bytes]) -> list[bytes]:
    """A line that links correctly to line 3: the line after it no longer does."""
    r = json.loads(lines[3])
    r.update(seq=4, action="rollback", prev_hash=json.loads(lines[2])["hash"])
    r["hash"] = record_hash(r)
    return [*lines[:3], canonical(r), *lines[3:]]


@pytest.mark.parametrize(("edit", "line", "words"), [
    (altered, 3, "altered"),
    (lambda ls: [*ls[:2], *ls[3:]], 3, "broken link"),  # deleted line 3
    (lambda ls: [*ls[:2], ls[3], ls[2], *ls[4:]], 3, "broken link"),  # lines 3 and 4 swapped
    (forged, 4, "broken link"),
    (forged_linked, 5, "broken link"),
    (lambda ls: ls[1:], 1, "genesis"),  # first line deleted
    (lambda ls: ls[:-1], 6, "deleted from its end"),  # last line deleted: the head knows
    (lambda ls: [*ls[:2], b"", *ls[2:]], 3, "empty line"),
], ids=["altered", "deleted", "swapped", "forged", "forged-linked", "first-deleted", "last-deleted", "blank"])
def test_verify_names_the_first_bad_line(tmp_path: Path, edit: Callable[[list[bytes]], list[bytes]], line: int,
                                         words: str) -> None:
    log = small_log(tmp_path / "audit.jsonl")
    assert log.verify().ok
    rewrite(log.path, edit)
    result = log.verify()
    assert not result.ok and result.line == line and words in (result.problem or ""), result.summary()

    cli = CliRunner().invoke(app, ["audit", "verify", "--path", str(log.path)])
    assert cli.exit_code == 1 and f"line {line}:" in cli.output and "Traceback" not in cli.output


def test_cli_verify_and_show_an_intact_log(tmp_path: Path) -> None:
    log = small_log(tmp_path / "audit.jsonl", 3)
    result = CliRunner().invoke(app, ["audit", "verify", "--path", str(log.path)])
    assert result.exit_code == 0 and "intact, 3 records" in result.output and len(result.output.splitlines()) == 1
    shown = CliRunner().invoke(app, ["audit", "show", "--last", "2", "--path", str(log.path)])
    assert shown.exit_code == 0 and len(shown.output.splitlines()) == 2 and "alias_move" in shown.output
    missing = CliRunner().invoke(app, ["audit", "verify", "--path", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "no audit log" in missing.output


def test_a_torn_last_line_is_reported_then_moved_aside_by_the_next_append(tmp_path: Path) -> None:
    log = small_log(tmp_path / "audit.jsonl", 4)
    whole = log.path.read_bytes()
    log.path.write_bytes(whole[:-40])  # a crash in the middle of writing record 4
    torn = whole[whole.rfind(b"\n", 0, len(whole) - 1) + 1:-40]
    # the head still names record 4 only if the crash came after it moved: model the crash before it
    log._write_head(3, json.loads(whole.splitlines()[2])["hash"])
    result = log.verify()
    assert not result.ok and result.line == 4 and "torn" in (result.problem or "")

    log.append("approval", model="m", version="4", details={"status": "approved"})
    result = log.verify()
    assert result.ok and result.records == 5, result.summary()
    records = log.records()
    assert [r["action"] for r in records[-2:]] == ["audit_repair", "approval"]
    side = tmp_path / records[-2]["details"]["moved_to"]
    assert side.read_bytes() == torn and records[-2]["details"]["torn_bytes"] == len(torn)


def test_a_record_written_before_its_head_moved_is_kept(tmp_path: Path) -> None:
    log = small_log(tmp_path / "audit.jsonl", 3)
    second = json.loads(log.path.read_bytes().splitlines()[1])
    log._write_head(2, second["hash"])  # a crash between the line's fsync and the head's rename
    assert log.verify().ok
    assert log.append("rollback", model="m")["seq"] == 4 and log.verify().ok


@pytest.mark.parametrize(("damage", "words"), [
    (lambda p: p.write_bytes(p.read_bytes() + b"garbage\n"), "not JSON"),
    (lambda p: rewrite(p, altered), None),  # an altered middle line: appends check the end only, verify finds it
    (lambda p: rewrite(p, lambda ls: ls[:-1]), "removed from its end"),
    (lambda p: p.with_name(p.name + ".head").unlink(), "head file"),
    (lambda p: p.unlink(), "missing or empty"),
], ids=["garbage-line", "altered-middle", "cut-end", "head-deleted", "log-deleted"])
def test_appends_refuse_to_chain_onto_a_damaged_end(tmp_path: Path, damage: Callable[[Path], Any],
                                                    words: str | None) -> None:
    log = small_log(tmp_path / "audit.jsonl", 5)
    damage(log.path)
    if words is None:
        log.append("register", model="m")
        assert not log.verify().ok
        return
    before = log.path.read_bytes() if log.path.exists() else None
    with pytest.raises(AuditError, match=words) as err:
        log.append("register", model="m")
    assert "xrayops audit verify" in (err.value.hint or "")
    assert (log.path.read_bytes() if log.path.exists() else None) == before, "a refused append wrote anyway"


def test_uris_in_details_are_masked(tmp_path: Path) -> None:
    record = AuditLog(tmp_path / "a.jsonl").append(
        "register", model="m", details={"source": "s3://key:secret@bucket/x", "nested": ["https://u:pw@h/y"]})
    text = json.dumps(record)
    assert "secret" not in text and "pw@" not in text and "u:***@h" in text


# --------------------------------------------------------------------------- concurrent writers


def test_concurrent_appends_from_processes_keep_one_chain(tmp_path: Path) -> None:
    writers, each = 4, 50
    path = tmp_path / "shared" / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or locks; the writer module is light
    barrier = ctx.Barrier(writers)
    procs = [ctx.Process(target=append_many, args=(str(path), w, each, barrier)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    log = AuditLog(path)
    result = log.verify()
    assert result.ok and result.records == writers * each, result.summary()
    seen = sorted((r["details"]["writer"], r["details"]["i"]) for r in log.records())
    assert seen == [(w, i) for w in range(writers) for i in range(each)], "records lost or duplicated"
