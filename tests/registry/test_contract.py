"""The registry contract's tag objects: what is written is what is read back, and None is never a tag."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.registry.contract import EVIDENCE_TAG, EvidenceTags, VersionRecord, VersionTags


def test_evidence_tag_round_trips_and_a_missing_uri_writes_no_tag() -> None:
    uri = "runs:/abc/evidence/v3/evidence.html"
    tags = EvidenceTags(html_uri=uri).to_tags()
    assert tags == {EVIDENCE_TAG: uri}
    assert EvidenceTags.from_tags(tags) == EvidenceTags(uri)
    assert EvidenceTags().to_tags() == {}
    assert EvidenceTags.from_tags({}) is None and EvidenceTags.from_tags({EVIDENCE_TAG: "None"}) is None


def test_version_record_reads_the_evidence_tag() -> None:
    mv = SimpleNamespace(name="m", version="3", run_id="abc", tags={EVIDENCE_TAG: "runs:/abc/x.html"}, status="READY")
    assert VersionRecord.from_version(mv).evidence == EvidenceTags("runs:/abc/x.html")
    assert VersionRecord.from_version(SimpleNamespace(name="m", version="4", tags={})).evidence is None


def test_no_tag_value_is_the_text_none() -> None:
    tags = VersionTags().to_tags()
    assert "None" not in tags.values() and tags["dvc_md5"] == tags["dvc_rev"] == "unversioned"
