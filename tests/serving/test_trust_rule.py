"""The serving trust rule (:func:`pipeline.serving.trust.judge`) on records built from the registry contract:
no MLflow, no model, milliseconds. The same rule against a real registry is ``test_trust.py``."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.registry.contract import ApprovalTags, ChampionTags, GateTags, RollbackTags, VersionRecord
from pipeline.serving import trust

MODEL = "xrayops-synthetic"
T1, T2, T3 = "2026-11-01T10:00:00+00:00", "2026-11-02T10:00:00+00:00", "2026-11-03T10:00:00+00:00"


def record(version: str, *, verdict: str | None = "pass", compared: str | None = None, since: str | None = T2,
           replaced: str | None = None, approval: str | None = None, rolled_back: str | None = None) -> VersionRecord:
    tags: dict[str, str] = {}
    if verdict is not None:
        tags |= GateTags.of(promote=verdict == "pass", failed=[] if verdict == "pass" else ["auc_floor"],
                            decided_at=T1, champion=compared, reason="r").to_tags()
    if approval is not None:
        tags |= ApprovalTags(approval, "dr-a", "", T1).to_tags()
    tags |= ChampionTags(since=since, previous_version=replaced).to_tags()
    if rolled_back is not None:
        tags |= RollbackTags(at=rolled_back, reason="bad").to_tags()
    return VersionRecord.from_version(SimpleNamespace(name=MODEL, version=version, run_id="r" + version, tags=tags))


def decision(version: str, *, promote: bool = True, compared: str | None = None, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "challenger_version": version, "champion_version": compared, "promote": promote,
            "reason": "all criteria passed" if promote else "failed: auc_floor"}


def approval(version: str, approved: bool = True) -> dict[str, Any]:
    return {"approved": approved, "status": "approved" if approved else "rejected", "version": version}


def judge(rec: VersionRecord, dec: dict[str, Any] | None = None, *, appr: dict[str, Any] | None = None,
          replaced: VersionRecord | None = None, latest: tuple[str, str] | None = None, alias: str = "champion",
          require_approval: bool = False) -> str | None:
    ev = trust.TrustEvidence(rec, dec, appr, replaced,
                        (latest[0], datetime.fromisoformat(latest[1])) if latest else None)
    found = trust.judge(ev, model=MODEL, alias=alias, require_approval=require_approval)
    return found[0] if found else None


V1 = record("1")  # the first champion: gated against none, replaced none


def test_a_promoted_first_champion_and_its_successor_are_trusted() -> None:
    assert judge(V1, decision("1")) is None
    v2 = record("2", compared="1", replaced="1", since=T3)
    assert judge(v2, decision("2", compared="1"), replaced=V1, latest=("1", T2)) is None


@pytest.mark.parametrize("rec", [record("3", verdict="fail"), record("3", verdict=None)], ids=["failed", "never"])
def test_a_version_without_a_passing_verdict_is_not_gated(rec: VersionRecord) -> None:
    assert judge(rec, decision("3")) == trust.NOT_GATED


@pytest.mark.parametrize("dec", [None, decision("3", promote=False), decision("4"), decision("3", model="other"),
                                 decision("3", compared="1")],
                         ids=["no-decision", "decision-says-no", "other-version", "other-model", "other-champion"])
def test_a_pass_tag_the_recorded_decision_does_not_back_is_not_gated(dec: dict[str, Any] | None) -> None:
    assert judge(record("3"), dec) == trust.NOT_GATED


def test_approval_needs_the_tag_and_the_record_for_this_version() -> None:
    approved = record("1", approval="approved")
    assert judge(approved, decision("1"), appr=approval("1"), require_approval=True) is None
    assert judge(approved, decision("1"), appr=None, require_approval=True) == trust.NOT_APPROVED
    assert judge(approved, decision("1"), appr=approval("2"), require_approval=True) == trust.NOT_APPROVED
    assert judge(record("1", approval="rejected"), decision("1"), appr=approval("1", False),
                 require_approval=True) == trust.NOT_APPROVED
    assert judge(V1, decision("1"), require_approval=True) == trust.NOT_APPROVED
    assert judge(V1, decision("1"), require_approval=False) is None


def test_an_alias_not_moved_by_the_pipeline_is_not_promoted() -> None:
    assert judge(record("3", since=None), decision("3")) == trust.NOT_PROMOTED
    assert judge(record("3", since="yesterday"), decision("3")) == trust.NOT_PROMOTED


def test_a_rolled_back_or_superseded_version_is_not_promoted() -> None:
    assert judge(record("2", compared="1", replaced="1", rolled_back=T3), decision("2", compared="1"),
                 replaced=V1) == trust.NOT_PROMOTED
    same_second = record("2", compared="1", replaced="1", since=T3, rolled_back=T3)
    assert judge(same_second, decision("2", compared="1"), replaced=V1) == trust.NOT_PROMOTED, "ties fail closed"
    restored = record("2", compared="1", replaced="1", since=T3, rolled_back=T2)
    assert judge(restored, decision("2", compared="1"), replaced=V1) is None
    assert judge(V1, decision("1"), latest=("2", T3)) == trust.NOT_PROMOTED
    assert judge(V1, decision("1"), latest=("2", T2)) is None, "a tie is not 'later'"


@pytest.mark.parametrize(("compared", "replaced"), [(None, "1"), ("1", None), ("1", "2")])
def test_a_champion_gated_against_another_version_than_it_replaced_is_a_lineage_mismatch(
        compared: str | None, replaced: str | None) -> None:
    rec = record("3", compared=compared, replaced=replaced, since=T3)
    assert judge(rec, decision("3", compared=compared), replaced=V1) == trust.LINEAGE_MISMATCH


def test_the_replaced_champion_must_exist_have_passed_and_have_been_champion() -> None:
    rec = record("3", compared="2", replaced="2", since=T3)
    dec = decision("3", compared="2")
    assert judge(rec, dec, replaced=record("2", since=T1)) is None
    assert judge(rec, dec, replaced=None) == trust.LINEAGE_MISMATCH
    assert judge(rec, dec, replaced=record("2", verdict="fail", since=T1)) == trust.LINEAGE_MISMATCH
    assert judge(rec, dec, replaced=record("2", since=None)) == trust.LINEAGE_MISMATCH


def test_other_aliases_need_the_gate_but_not_the_champion_history() -> None:
    challenger = record("3", since=None)
    assert judge(challenger, decision("3"), alias="challenger") is None
    assert judge(record("3", verdict="fail", since=None), decision("3"), alias="challenger") == trust.NOT_GATED


def test_every_reason_has_a_meaning_and_details_carry_no_exception_text() -> None:
    assert set(trust.REASONS) == {trust.ALIAS_MISSING, trust.REGISTRY_UNREACHABLE, trust.NOT_GATED,
                                  trust.NOT_APPROVED, trust.NOT_PROMOTED, trust.LINEAGE_MISMATCH, trust.LOAD_FAILED}
    ev = trust.TrustEvidence(record("3", verdict="fail"), None, None, None, None)
    reason, detail = trust.judge(ev, model=MODEL, alias="champion", require_approval=False)  # type: ignore[misc]
    assert reason == trust.NOT_GATED and "v3" in detail and "Traceback" not in detail
