"""The evidence pack's checklist table cites the published item numbers (fast: the table only, no model).

Verified against CLAIM 2024 (Tejani et al., Radiol Artif Intell 2024;6(4):e240300, 44 items) and TRIPOD+AI
(Collins et al., BMJ 2024;385:e078378); see :mod:`pipeline.registry.evidence_report`. The asserted numbers are
the ones that changed from CLAIM 2020 and were wrong here before (e.g. failure analysis was cited as 37).
"""

from __future__ import annotations

from pipeline.registry.evidence_report import (
    ANSWERED,
    CLAIM,
    CLAIM_2024_ITEMS,
    GOVERNANCE,
    ITEMS,
    NOT_AVAILABLE,
    PARTLY,
    STUDY_TEAM,
    STUDY_TEAM_NOTE,
    TRIPOD,
    TRIPOD_AI_ITEMS,
    checklist,
)

ROWS = {(standard, item): (title, sections, note) for standard, item, title, sections, note in ITEMS}


def test_every_row_cites_an_item_the_published_checklist_has_once() -> None:
    keys = [(s, n) for s, n, *_ in ITEMS]
    assert len(keys) == len(set(keys))
    assert len(CLAIM_2024_ITEMS) == 44 and len(TRIPOD_AI_ITEMS) == 52 and len(set(TRIPOD_AI_ITEMS)) == 52
    for standard, item in keys:
        assert item in {CLAIM: CLAIM_2024_ITEMS, TRIPOD: TRIPOD_AI_ITEMS, GOVERNANCE: ("G1", "G2", "G3")}[standard]


def test_verified_item_numbers_carry_their_published_topics() -> None:
    expected = {
        (CLAIM, "11"): ("De-identification", ("deidentification",)),
        (CLAIM, "19"): ("assigned to partitions", ("leakage",)),
        (CLAIM, "20"): ("partitions are disjoint", ("leakage",)),
        (CLAIM, "32"): ("Evaluation on internal data", ("metrics",)),  # the held-out test partition
        (CLAIM, "33"): ("Testing on external data", ()),
        (CLAIM, "35"): ("included and excluded", ("flow",)),
        (CLAIM, "36"): ("characteristics of cases in each partition", ("demographics",)),
        (CLAIM, "39"): ("Failure analysis", ("failure_analysis",)),
        (CLAIM, "40"): ("limitations", ("model_card",)),
        (TRIPOD, "12a"): ("partitioning", ("leakage",)),
        (TRIPOD, "14"): ("Fairness", ("subgroups", "gate")),
        (TRIPOD, "15"): ("threshold", ("threshold",)),
        (TRIPOD, "20a"): ("Flow of participants", ("flow",)),
        (TRIPOD, "23a"): ("confidence intervals", ("metrics", "subgroups")),
        (TRIPOD, "24"): ("model updating", ("diff",)),
    }
    for key, (topic, sections) in expected.items():
        title, mapped, _ = ROWS[key]
        assert topic.lower() in title.lower() and mapped == sections, (key, title, mapped)
    # CLAIM 2020 numbers that the 2024 update moved must not come back with their old topics
    assert "external" not in ROWS[(CLAIM, "32")][0].lower()
    assert (CLAIM, "34") not in ROWS  # 2024 item 34 is trial registration, not demographics


def test_items_the_pipeline_cannot_answer_are_left_to_the_study_team() -> None:
    sections = {key: {"x": 1} for _, _, _, keys, _ in ITEMS for key in keys}
    rows = {(r["standard"], r["item"]): r for r in checklist(sections, {})}
    for key in [(CLAIM, "18"), (CLAIM, "21"), (CLAIM, "33"), (TRIPOD, "10"), (TRIPOD, "17")]:
        assert rows[key]["status"] == STUDY_TEAM and rows[key]["note"].startswith(STUDY_TEAM_NOTE), key
        assert not rows[key]["artefacts"]
    assert rows[(CLAIM, "11")]["status"] == ANSWERED and rows[(CLAIM, "40")]["status"] == PARTLY
    missing = {(r["standard"], r["item"]): r for r in checklist({}, {})}  # a version with nothing recorded
    assert missing[(CLAIM, "11")]["status"] == NOT_AVAILABLE and missing[(CLAIM, "33")]["status"] == STUDY_TEAM
