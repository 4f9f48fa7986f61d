"""Clinician feedback: validation, adjudication, accuracy per version, and the DVC-versioned feedback dataset."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.data.imaging import decode_bytes
from pipeline.errors import FeedbackError
from pipeline.monitoring.feedback import (
    ADJUDICATIONS_FILE,
    IMAGES_DIR,
    RECORDS_DIR,
    FeedbackRecord,
    accuracy_by_version,
    adjudicate,
    feedback_dataset_dir,
    ingest_feedback,
    read_feedback,
    record_feedback,
    summary_markdown,
    wilson,
    write_dataset,
)
from pipeline.serving.production_log import append
from tests.serving.helpers import png
from tests.serving.test_production_log import corrupt

CLINICIANS = [f"U{i:016x}" for i in range(1, 4)]  # pseudonymous user ids (pipeline.ui.auth.user_id_for)


def rec(rid: str, version: str, predicted: str, correct: str, user: str | None = CLINICIANS[0],
        kind: str = "feedback") -> FeedbackRecord:
    return FeedbackRecord(request_id=rid, model_name="m", model_version=version, predicted_label=predicted,
                          probability=0.7, verdict="agree" if predicted == correct else "disagree",
                          correct_label=correct, comment="ok", user_id=user, kind=kind)  # type: ignore[arg-type]


XRAY = ("NORMAL", "PNEUMONIA")


def agreed(feedback_log: Path, rid: str, version: str, predicted: str, correct: str, seed: int) -> None:
    """Two distinct clinicians give the case the same label (the default consensus rule)."""
    for user in CLINICIANS[:2]:
        record_feedback(feedback_log, rec(rid, version, predicted, correct, user),
                        image=decode_bytes(png(seed), max_pixels=10**6), classes=XRAY)


def test_records_are_validated_and_append_only(tmp_path: Path) -> None:
    rid = uuid.uuid4().hex
    with pytest.raises(FeedbackError, match="32-digit"):
        record_feedback(tmp_path, rec("../../etc/passwd", "1", "A", "A"), classes=("A", "B"))
    with pytest.raises(FeedbackError, match="agree"):
        record_feedback(tmp_path, FeedbackRecord(rid, "m", "1", "A", 0.5, "agree", "B"), classes=("A", "B"))
    record_feedback(tmp_path, rec(rid, "1", "A", "B"), image=decode_bytes(png(1), max_pixels=10**6),
                    classes=("A", "B"))
    record_feedback(tmp_path, rec(rid, "1", "A", "B"), classes=("A", "B"))
    assert len(read_feedback(tmp_path)) == 2 and (tmp_path / "images" / f"{rid}.png").is_file()


def test_clinicians_answering_one_case_at_once_each_store_a_whole_image(tmp_path: Path) -> None:
    """Before: every answer to a request wrote the same temp name (``.<rid>.png.tmp``), so two at once
    renamed each other's file away (FileNotFoundError) or published a half-written one."""
    import threading

    rid, n = uuid.uuid4().hex, 8
    images = {png(seed) for seed in range(n)}
    start, errors = threading.Barrier(n), []

    def answer(seed: int) -> None:
        try:
            start.wait(30)
            record_feedback(tmp_path, rec(rid, "1", "NORMAL", "PNEUMONIA", CLINICIANS[seed % 3]),
                            image=decode_bytes(png(seed), max_pixels=10**6), classes=XRAY)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=answer, args=(seed,)) for seed in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(read_feedback(tmp_path)) == n
    assert [p.name for p in (tmp_path / IMAGES_DIR).iterdir()] == [f"{rid}.png"], "a temp file was left behind"
    stored = decode_bytes((tmp_path / IMAGES_DIR / f"{rid}.png").read_bytes(), max_pixels=10**6)
    assert any(stored.pixels.tobytes() == decode_bytes(img, max_pixels=10**6).pixels.tobytes() for img in images)


def test_a_disk_error_before_the_image_is_durable_publishes_neither_image_nor_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image is fsynced before its rename: a disk that fails the flush leaves no image (not even a
    temp file) and no record pointing at one."""
    import errno
    import os

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    rid = uuid.uuid4().hex
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        record_feedback(tmp_path, rec(rid, "1", "NORMAL", "PNEUMONIA"), image=decode_bytes(png(1), max_pixels=10**6),
                        classes=XRAY)
    monkeypatch.undo()
    assert list((tmp_path / IMAGES_DIR).iterdir()) == []
    assert read_feedback(tmp_path).empty


@pytest.mark.parametrize("label", ["../../x", "PNEUMONA", "pneumonia", "", "NORMAL/../PNEUMONIA"])
def test_a_label_outside_the_model_classes_is_rejected_when_recorded(tmp_path: Path, label: str) -> None:
    with pytest.raises(FeedbackError, match="not one of the model's classes: NORMAL, PNEUMONIA") as err:
        record_feedback(tmp_path, rec(uuid.uuid4().hex, "1", "NORMAL", label), classes=XRAY)
    assert err.value.hint and "NORMAL, PNEUMONIA" in err.value.hint
    assert list(tmp_path.iterdir()) == [], "nothing is written for a rejected label"
    record_feedback(tmp_path, rec(uuid.uuid4().hex, "1", "NORMAL", "PNEUMONIA"), classes=XRAY)  # the valid label
    assert read_feedback(tmp_path)["correct_label"].tolist() == ["PNEUMONIA"]


def _old_record(feedback_dir: Path, rid: str, label: str) -> None:
    """A record appended without validation (an older version, another tool): its image is kept too."""
    rows = [{**asdict(rec(rid, "1", "NORMAL", label, user)), "has_image": True} for user in CLINICIANS[:2]]
    append(feedback_dir / RECORDS_DIR, pd.DataFrame(rows), time_column="submitted_at")
    (feedback_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (feedback_dir / IMAGES_DIR / f"{rid}.png").write_bytes(png(3))


@pytest.mark.parametrize("label", ["../../x", "PNEUMONA"])
def test_invalid_labels_never_become_dataset_folders(make_settings: Callable[..., Settings], label: str) -> None:
    settings = make_settings("data.version_with_dvc=false")
    good, bad = uuid.uuid4().hex, uuid.uuid4().hex
    agreed(settings.feedback_log, good, "1", "NORMAL", "PNEUMONIA", 2)
    _old_record(settings.feedback_log, bad, label)
    dest = feedback_dataset_dir(settings)
    with pytest.raises(FeedbackError, match=rf"not one of the model's classes \(NORMAL, PNEUMONIA\): {bad}: "):
        ingest_feedback(settings)
    assert not dest.exists() and not (dest.parent / "x").exists() and not (dest.parent.parent / "x").exists()
    # a senior reader's valid adjudication resolves the case; an invalid one is rejected with its line
    (settings.feedback_log / ADJUDICATIONS_FILE).write_text(f"request_id,label\n{good},PNEUMONIA\n{bad},{label}\n")
    with pytest.raises(FeedbackError, match=r"adjudications.csv: 1 row\(s\) are not usable \(line 3: label"):
        ingest_feedback(settings)
    assert not dest.exists()
    (settings.feedback_log / ADJUDICATIONS_FILE).write_text(f"request_id,label\n{bad}, NORMAL\n")
    summary = ingest_feedback(settings)
    assert summary["images_by_label"] == {"PNEUMONIA": 1, "NORMAL": 1}
    assert sorted(p.name for p in dest.iterdir()) == ["NORMAL", "PNEUMONIA"]


def test_write_dataset_checks_each_label_before_building_a_path(tmp_path: Path) -> None:
    rid = uuid.uuid4().hex
    (tmp_path / IMAGES_DIR).mkdir()
    (tmp_path / IMAGES_DIR / f"{rid}.png").write_bytes(png(1))
    cases = pd.DataFrame([{"request_id": rid, "label": "../../x", "status": "adjudicated"}])
    with pytest.raises(FeedbackError, match="NORMAL, PNEUMONIA"):
        write_dataset(cases, tmp_path, tmp_path / "ds", XRAY)
    cases = pd.DataFrame([{"request_id": "../x", "label": "NORMAL", "status": "adjudicated"}])
    with pytest.raises(FeedbackError, match="32-digit"):
        write_dataset(cases, tmp_path, tmp_path / "ds", XRAY)
    assert not (tmp_path / "ds").exists() and not (tmp_path.parent / "x").exists()


def test_adjudication_and_accuracy_by_version() -> None:
    ids = [uuid.uuid4().hex for _ in range(5)]
    records = pd.DataFrame([rec(ids[0], "1", "P", "P"), rec(ids[1], "1", "P", "N"),
                            rec(ids[1], "1", "P", "N", CLINICIANS[1]),
                            rec(ids[2], "1", "N", "N"), rec(ids[2], "1", "N", "P", CLINICIANS[1]),  # conflict
                            rec(ids[3], "2", "N", "N"), rec(ids[4], "2", "P", "N")]).astype({"submitted_at": str})
    cases = adjudicate(records, min_clinicians=1, adjudicator_decides=True).set_index("request_id")
    assert cases.loc[ids[1], "status"] == "consensus" and cases.loc[ids[1], "label"] == "N"
    assert cases.loc[ids[2], "status"] == "conflict" and cases.loc[ids[2], "label"] is None
    acc = {a["model_version"]: a for a in accuracy_by_version(cases.reset_index())}
    assert (acc["1"]["cases"], acc["1"]["correct"], acc["1"]["accuracy"]) == (2, 1, 0.5)
    assert (acc["2"]["cases"], acc["2"]["accuracy"]) == (2, 0.5)
    # a senior reader's adjudication resolves the conflict
    override = pd.DataFrame({"request_id": [ids[2]], "label": ["P"]})
    resolved = adjudicate(records, override, min_clinicians=1, adjudicator_decides=True).set_index("request_id")
    assert resolved.loc[ids[2], "status"] == "adjudicated" and resolved.loc[ids[2], "label"] == "P"
    lo, hi = wilson(1, 2)
    assert 0 < lo < 0.5 < hi < 1 and wilson(0, 0) == (0.0, 1.0)


def test_ingest_builds_a_dvc_versioned_folder_dataset(dvc_project: Callable[..., Settings]) -> None:
    from pipeline.data.sources.folder import FolderSource

    settings = dvc_project()
    ids = [uuid.uuid4().hex for _ in range(4)]
    truth = ["PNEUMONIA", "NORMAL", "NORMAL", "PNEUMONIA"]
    predicted = ["PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL"]
    for i, (rid, t, p) in enumerate(zip(ids, truth, predicted, strict=True)):
        agreed(settings.feedback_log, rid, "3", p, t, i)
    summary = ingest_feedback(settings)
    dest = Path(summary["dataset_dir"])
    assert dest == settings.root / "data" / "raw" / settings.monitor.feedback_dataset
    assert summary["images_by_label"] == {"PNEUMONIA": 2, "NORMAL": 2}
    assert summary["accuracy_by_version"][0] | {"ci95": None} == {
        "model_name": "m", "model_version": "3", "cases": 4, "correct": 2, "accuracy": 0.5, "ci95": None}
    assert summary["dvc"]["dvc_md5"].endswith(".dir") and (dest.parent / f"{dest.name}.dvc").is_file()
    labels = {r.ref.split("/")[1].removesuffix(".png"): r.label for r in FolderSource().records(dest, None)}
    assert labels == dict(zip(ids, truth, strict=True)), "the next training run reads it as a folder source"
    # re-adjudicating a case moves it and gives a new dataset version
    (settings.feedback_log / ADJUDICATIONS_FILE).write_text(f"request_id,label\n{ids[0]},NORMAL\n")
    again = ingest_feedback(settings)
    assert again["images_by_label"] == {"NORMAL": 3, "PNEUMONIA": 1}
    assert again["dvc"]["dvc_md5"] != summary["dvc"]["dvc_md5"]
    assert not (dest / "PNEUMONIA" / f"{ids[0]}.png").exists()


@pytest.mark.slow
def test_feedback_flow_in_prefect(prefect_harness: None, make_settings: Callable[..., Settings]) -> None:
    from flows.feedback import FeedbackParameters, feedback_flow

    settings = make_settings("data.version_with_dvc=false")
    rid = uuid.uuid4().hex
    agreed(settings.feedback_log, rid, "1", "NORMAL", "PNEUMONIA", 2)
    summary = feedback_flow(FeedbackParameters(params_path=str(settings.root / "params.yaml")))
    assert summary["images_by_label"] == {"PNEUMONIA": 1} and summary["dvc"] is None
    assert summary["accuracy_by_version"][0]["accuracy"] == 0.0 and Path(summary["report"]).is_file()


@pytest.mark.slow
def test_a_bad_adjudication_label_fails_the_flow_once_without_retries(prefect_harness: None,
                                                                      make_settings: Callable[..., Settings]) -> None:
    """A wrong label fails the same way on every try: the task is not retried (it was, twice, 6 s of waiting)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.feedback import FeedbackParameters, feedback_flow

    settings = make_settings("data.version_with_dvc=false")
    rid = uuid.uuid4().hex
    record_feedback(settings.feedback_log, rec(rid, "1", "NORMAL", "PNEUMONIA"),
                    image=decode_bytes(png(3), max_pixels=10**6), classes=XRAY)
    (settings.feedback_log / ADJUDICATIONS_FILE).write_text(f"request_id,label\n{rid},PNEUMONA\n")
    state = feedback_flow(FeedbackParameters(params_path=str(settings.root / "params.yaml")), return_state=True)
    assert state.is_failed()
    with pytest.raises(FeedbackError, match="PNEUMONA"):
        state.result()
    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=this_run)
    assert [(r.name.split("-")[0], r.run_count) for r in runs] == [("ingest", 1)], [(r.name, r.run_count) for r in runs]


def test_a_damaged_record_file_is_skipped_and_counted(make_settings: Callable[..., Settings],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings("data.version_with_dvc=false", "monitor.feedback_min_clinicians=1")
    ids = [uuid.uuid4().hex for _ in range(3)]
    for i, rid in enumerate(ids):
        record_feedback(settings.feedback_log, rec(rid, "1", "NORMAL", "PNEUMONIA"),
                        image=decode_bytes(png(i), max_pixels=10**6), classes=XRAY)
    bad = corrupt(settings.feedback_log / RECORDS_DIR)
    skipped: list[str] = []
    with caplog.at_level(logging.WARNING):
        records = read_feedback(settings.feedback_log, skipped)
    assert len(records) == 2 and sorted(skipped) == sorted(map(str, bad))
    assert [r.exc_info for r in caplog.records if r.levelno == logging.WARNING] == [None]
    summary = ingest_feedback(settings)
    assert summary["records"] == 2 and summary["skipped_parts"] == 2 and summary["images_by_label"] == {"PNEUMONIA": 2}
    assert "unreadable record files skipped: 2" in summary_markdown(summary)


def test_consensus_needs_distinct_signed_in_clinicians_or_an_adjudicator() -> None:
    a, b, c, d = (uuid.uuid4().hex for _ in range(4))
    adj = CLINICIANS[2]
    records = pd.DataFrame([
        rec(a, "1", "P", "N"), rec(a, "1", "P", "N"),  # the same clinician twice: one reader
        rec(b, "1", "P", "N"), rec(b, "1", "P", "N", CLINICIANS[1]),  # two distinct clinicians agree
        rec(c, "1", "P", "N", None), rec(c, "1", "P", "N", None), rec(c, "1", "P", "N", None),  # nobody signed in
        rec(d, "1", "P", "N"), rec(d, "1", "P", "P", CLINICIANS[1]),  # disagreement ...
        rec(d, "1", "P", "P", adj, "adjudication"), rec(d, "1", "P", "N", adj, "adjudication"),  # ... decided (last)
    ]).astype({"submitted_at": str})
    cases = adjudicate(records, min_clinicians=2, adjudicator_decides=True).set_index("request_id")
    assert cases.loc[a, ["status", "clinicians"]].tolist() == ["pending", 1] and cases.loc[a, "label"] is None
    assert cases.loc[b, ["status", "label", "clinicians"]].tolist() == ["consensus", "N", 2]
    assert cases.loc[c, ["status", "clinicians"]].tolist() == ["pending", 0]
    assert cases.loc[d, ["status", "label", "labels"]].tolist() == ["adjudicated", "N", "N,P"]
    strict = adjudicate(records, min_clinicians=3, adjudicator_decides=False).set_index("request_id")
    assert strict["status"].to_dict() == {a: "pending", b: "pending", c: "pending", d: "conflict"}
    lenient = adjudicate(records, min_clinicians=1, adjudicator_decides=True).set_index("request_id")
    assert lenient.loc[a, "status"] == "consensus" and lenient.loc[c, "status"] == "pending"
    csv = pd.DataFrame({"request_id": [d], "label": ["P"]})  # the senior reader's CSV beats UI decisions
    assert adjudicate(records, csv, min_clinicians=2, adjudicator_decides=True).set_index(
        "request_id").loc[d, "label"] == "P"
    assert accuracy_by_version(cases.reset_index())[0]["cases"] == 2, "pending cases are not scored"


@pytest.mark.parametrize("user", ["alice", "alice@example.org", "U123", "u0000000000000001"])
def test_a_user_name_never_reaches_the_feedback_store(tmp_path: Path, user: str) -> None:
    with pytest.raises(FeedbackError, match="pseudonymous id"):
        record_feedback(tmp_path, rec(uuid.uuid4().hex, "1", "NORMAL", "NORMAL", user), classes=XRAY)
    with pytest.raises(FeedbackError, match="adjudicator's pseudonymous user id"):
        record_feedback(tmp_path, rec(uuid.uuid4().hex, "1", "NORMAL", "NORMAL", None, "adjudication"), classes=XRAY)
    assert list(tmp_path.iterdir()) == []


def test_ingest_waits_for_a_second_clinician(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings("data.version_with_dvc=false")
    rid, old = uuid.uuid4().hex, uuid.uuid4().hex
    record_feedback(settings.feedback_log, rec(rid, "1", "NORMAL", "PNEUMONIA"),
                    image=decode_bytes(png(1), max_pixels=10**6), classes=XRAY)
    legacy = {k: v for k, v in asdict(rec(old, "1", "NORMAL", "NORMAL")).items() if k not in ("user_id", "kind")}
    append(settings.feedback_log / RECORDS_DIR, pd.DataFrame([legacy, legacy]), time_column="submitted_at")
    summary = ingest_feedback(settings)
    assert summary["images_by_label"] == {} and sorted(summary["pending"]) == sorted([rid, old])
    assert summary["consensus_rule"] == {"min_clinicians": 2, "adjudicator_decides": True}
    assert "waiting for more readers (fewer than 2 clinicians agree): 2" in summary_markdown(summary)
    record_feedback(settings.feedback_log, rec(rid, "1", "NORMAL", "PNEUMONIA", CLINICIANS[1]), classes=XRAY)
    summary = ingest_feedback(settings)
    assert summary["images_by_label"] == {"PNEUMONIA": 1} and summary["pending"] == [old]
    assert (feedback_dataset_dir(settings) / "PNEUMONIA" / f"{rid}.png").is_file()
