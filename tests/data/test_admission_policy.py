"""The admission policy (``data.admission``): only chest radiographs are ingested, validated and served.

Each rule on its own (pure), then a PACS-like folder through the real ``dicom`` ingest (every file
accounted for: ingested, quarantined or excluded per reason, listed in ``excluded.csv``), the GX
suite on a manifest that a lax policy let CT rows into, and the serving input gate.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.data.ingest import run_ingest
from pipeline.data.policy import POLICY_REASONS, OutOfPolicy
from pipeline.errors import Rejected, ValidationFailed
from pipeline.serving.admission import admit
from tests.data.helpers import chest_policy, colour, dicom_bytes, edited, foreign, multi_frame, xray

CHEST = {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA",
         "PhotometricInterpretation": "MONOCHROME2", "SamplesPerPixel": 1}


@pytest.mark.parametrize(("changes", "reason"), [
    ({"Modality": "CT"}, "modality"),
    ({"Modality": None}, "modality"),
    ({"BodyPartExamined": "HEAD"}, "body_part"),
    ({"ViewPosition": "LL"}, "view"),
    ({"NumberOfFrames": "3"}, "frames"),
    ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "colour"),
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour"),
    ({"PresentationIntentType": "FOR PROCESSING"}, "presentation_intent"),
    ({"BurnedInAnnotation": "YES"}, "burned_in"),
])
def test_each_rule_excludes_with_its_own_reason(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(OutOfPolicy) as info:
        chest_policy().check({**CHEST, **changes})
    assert info.value.reason == reason and reason in POLICY_REASONS
    assert "admitted" in info.value.detail or reason == "burned_in"


@pytest.mark.parametrize("changes", [
    {},
    {"Modality": "cr", "BodyPartExamined": None, "ViewPosition": None},  # many CR exports leave both empty
    {"BodyPartExamined": " chest ", "ViewPosition": "AP", "PhotometricInterpretation": "MONOCHROME1"},
    {"PresentationIntentType": "FOR PRESENTATION", "NumberOfFrames": "1", "BurnedInAnnotation": "NO"},
])
def test_chest_radiographs_as_vendors_write_them_are_admitted(changes: dict[str, Any]) -> None:
    chest_policy().check({**CHEST, **changes})


def test_the_policy_is_configuration() -> None:
    with pytest.raises(OutOfPolicy):
        chest_policy(allow_missing_view=False).check({**CHEST, "ViewPosition": None})
    chest_policy(views=frozenset({"PA", "AP", "LL"})).check({**CHEST, "ViewPosition": "LL"})
    chest_policy(exclude_burned_in=False).check({**CHEST, "BurnedInAnnotation": "YES"})


# --------------------------------------------------------------------------- a PACS-like folder


def pacs_folder(root: Path) -> dict[str, str]:
    """Write a mixed export under ``root`` (with labels.csv); returns file → expected outcome."""
    def chest(i: int, **kw: Any) -> bytes:
        return dicom_bytes(xray(i, 0, i % 2 == 1), patient_id=f"MRN-{i:03d}", **kw)

    files: dict[str, tuple[bytes, str]] = {
        "dx_pa.dcm": (chest(0), "ingested"),
        "cr_bare.dcm": (edited(chest(1, modality="CR", view=None), BodyPartExamined=None), "ingested"),
        "dx_ap_chest.dcm": (edited(chest(2, view="AP"), BodyPartExamined="CHEST",
                                   PresentationIntentType="FOR PRESENTATION"), "ingested"),
        "ct.dcm": (foreign("CT_small.dcm", PatientID="MRN-100"), "modality"),
        "mr.dcm": (foreign("MR_small.dcm", PatientID="MRN-101"), "modality"),
        "nm.dcm": (foreign("JPGExtended.dcm", PatientID="MRN-102"), "modality"),
        "dx_lateral.dcm": (chest(3, view="LL"), "view"),
        "dx_head.dcm": (edited(chest(4), BodyPartExamined="HEAD"), "body_part"),
        "dx_raw.dcm": (edited(chest(5), PresentationIntentType="FOR PROCESSING"), "presentation_intent"),
        "dx_cine.dcm": (multi_frame(chest(6), 3), "frames"),
        "dx_rgb.dcm": (colour(chest(7)), "colour"),
        "dx_burned.dcm": (edited(chest(8), BurnedInAnnotation="YES"), "burned_in"),
        "dx_cut.dcm": (chest(9)[:-1000], "truncated"),
    }
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("file", "label"))
        for i, (name, (data, _)) in enumerate(files.items()):
            (root / name).write_bytes(data)
            writer.writerow((name, "PNEUMONIA" if i % 2 else "NORMAL"))
    return {name: outcome for name, (_, outcome) in files.items()}


def test_a_pacs_export_ingests_only_chest_radiographs_and_accounts_for_every_file(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    expected = pacs_folder(tmp_path / "pacs")
    settings = make_settings("data.source=dicom", f"data.input={tmp_path / 'pacs'}", "data.version_with_dvc=false",
                             "data.ingest.workers=1")
    summary = run_ingest(settings, show_progress=False)
    want_excluded = {r: sum(v == r for v in expected.values()) for r in POLICY_REASONS}
    assert summary["excluded_by_policy"] == {r: n for r, n in want_excluded.items() if n}
    assert summary["ingested"] == sum(v == "ingested" for v in expected.values()) == 3
    assert summary["quarantine_reasons"] == {"truncated": 1}
    assert summary["files_seen"] == summary["files_found"] == len(expected)
    assert summary["ingested"] + summary["quarantined"] + sum(summary["excluded_by_policy"].values()) == len(expected)
    with open(settings.dataset_dir / "excluded.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["reason"] for r in rows) == sorted(v for v in expected.values() if v in POLICY_REASONS)
    assert not any("MRN" in r["path"] or ".dcm" not in r["path"] for r in rows)  # de-identified references
    df = pd.read_parquet(settings.dataset_dir / "manifest.parquet")
    assert set(df["modality"]) == {"DX", "CR"} and set(df["view_position"].dropna()) <= {"PA", "AP"}


def test_validation_stops_a_manifest_with_ct_rows(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A lax policy (or an old ingest) let CT rows in: the critical modality expectation fails."""
    from pipeline.data.validate import run_validation

    root = tmp_path / "pacs"
    root.mkdir()
    lines = ["file,label"]
    for i in range(6):
        data = dicom_bytes(xray(i, 0, i % 2 == 1), patient_id=f"P{i}", modality="CT" if i < 2 else "DX")
        (root / f"img{i}.dcm").write_bytes(data)
        lines.append(f"img{i}.dcm,{'PNEUMONIA' if i % 2 else 'NORMAL'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    common = ["data.source=dicom", f"data.input={root}", "data.version_with_dvc=false", "data.ingest.workers=1",
              "validate.min_rows=3"]
    lax = make_settings(*common, "data.admission.modalities=[CR, DX, CT]")
    assert run_ingest(lax, show_progress=False)["ingested"] == 6
    with pytest.raises(ValidationFailed) as info:
        run_validation(make_settings(*common))
    assert "expect_column_values_to_be_in_set(modality)" in str(info.value) and "critical" in str(info.value)
    assert run_validation(lax)["critical_failures"] == []  # the same rows pass under the policy that let them in


def test_the_api_gate_refuses_what_ingestion_excludes(make_settings: Callable[..., Settings]) -> None:
    serve = make_settings().serve
    policy = chest_policy()
    ct = foreign("CT_small.dcm")
    with pytest.raises(Rejected) as info:
        admit(ct, serve, policy=policy)
    assert info.value.reason == "out_of_policy" and info.value.status == 422 and "modality" in info.value.detail
    lateral = dicom_bytes(xray(0, 0, False), patient_id="P", view="LL")
    with pytest.raises(Rejected, match="view"):
        admit(lateral, serve, policy=policy)
    assert admit(dicom_bytes(xray(0, 0, False), patient_id="P"), serve, policy=policy).width > 0
