"""Evidence pack (issue 16 item 7): written with every registered version, complete, resolvable, PHI-free.

Uses the session's trained ``champion_project`` (no extra training): its champion got a pack when it
was registered and gated; a second version of the same run (``gated_copy``) gets a diff against it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.config import Settings
from pipeline.registry.contract import CHAMPION, EVIDENCE_TAG, card_path, evidence_path
from pipeline.registry.evidence import MARKER, build_pack
from pipeline.registry.evidence_report import ANSWERED, ITEMS, NOT_AVAILABLE, PARTLY, STUDY_TEAM
from pipeline.registry.read import artifact_exists, get_alias, get_version
from tests.data.helpers import PHI, find_tokens

pytestmark = pytest.mark.slow  # the session's trained champion (≈ 15 s once)


def _champion(settings: Settings) -> Any:
    mv = get_alias(settings, CHAMPION)
    assert mv is not None
    return mv


def _load(settings: Settings, version: str) -> dict[str, Any]:
    return json.loads(evidence_path(settings, version, "json").read_text())


def _resolves(settings: Settings, pack: dict[str, Any], artefact: dict[str, str]) -> bool:
    kind, path = artefact["kind"], artefact["path"]
    if kind == "section":
        key = path.removeprefix("#")
        return bool(pack["sections"].get(key) or pack.get(key))
    if kind == "file":
        return Path(path).is_file()
    if kind == "mlflow":
        return artifact_exists(settings, artefact["run_id"], path)
    if kind == "code":
        return importlib.util.find_spec(path) is not None
    return False


def test_registered_version_has_a_complete_pack(champion_project: Settings) -> None:
    settings, mv = champion_project, _champion(champion_project)
    v = str(mv.version)
    json_file, html_file = evidence_path(settings, v, "json"), evidence_path(settings, v, "html")
    assert json_file.is_file() and html_file.is_file()
    pack = _load(settings, v)
    assert pack["model"] == settings.registered_model and pack["version"] == v

    items = pack["items"]
    assert [(i["standard"], i["item"]) for i in items] == [(s, n) for s, n, *_ in ITEMS]
    assert 30 <= len(items) <= 60
    assert all(i["status"] in (ANSWERED, PARTLY, NOT_AVAILABLE, STUDY_TEAM) for i in items)
    status = {(i["standard"], i["item"]): i["status"] for i in items}
    # CLAIM 2024 numbering (Tejani et al. 2024): 11 de-identification, 32 internal testing, 35 included/excluded,
    # 36 demographics per partition, 39 failure analysis; TRIPOD+AI 14 fairness, 15 threshold, 20a flow, 23a CIs
    for key in [("CLAIM 2024", n) for n in ("7", "8", "11", "19", "20", "28", "29", "32", "35", "36", "39")] + [
            ("TRIPOD+AI", n) for n in ("14", "15", "20a", "23a")] + [("governance", "G1"), ("governance", "G3")]:
        assert status[key] == ANSWERED, (key, status[key])
    assert status[("CLAIM 2024", "33")] == STUDY_TEAM  # no external test set: said, not hidden
    for item in items:
        if item["status"] not in (NOT_AVAILABLE, STUDY_TEAM):
            assert item["artefacts"], item
        unresolved = [a for a in item["artefacts"] if not _resolves(settings, pack, a)]
        assert not unresolved, (item["item"], unresolved)

    s = pack["sections"]
    flow = s["flow"]
    excluded = flow["excluded_by_label_mapping"] + sum(flow["excluded_by_policy"].values())
    assert excluded + sum(flow["quarantined"].values()) + flow["ingested"] == flow["files_found"]
    assert sum(flow["split_images"].values()) + (flow["dropped_at_split"] or 0) == flow["ingested"]
    assert s["leakage"]["patient_overlap"] == 0 and s["leakage"]["matches_version"]
    demo = s["demographics"]
    assert sum(demo["images"].values()) == sum(flow["split_images"].values())
    for counts in demo["by"].values():  # every attribute's categories add up to the split sizes
        assert {sp: sum(c[sp] for c in counts.values()) for sp in demo["images"]} == demo["images"]
    assert s["metrics"]["ci"]["auc"] and "ece" in s["calibration"] and s["threshold"]["threshold"] > 0
    assert s["gate"]["promote"] is True and s["audit"]["chain_ok"] and s["audit"]["head_hash"]
    assert {r["action"] for r in s["audit"]["records"]} >= {"register", "gate_decision"}
    assert s["software"]["packages"]["tensorflow"] and s["software"]["python"]
    envelope = pack["change_envelope"]
    assert envelope["acceptance_criteria"]["auc_margin_non_inferiority"] == settings.promote.auc_margin
    assert envelope["fixed"]["architecture"] == s["model"]["architecture"]

    html = html_file.read_text()
    assert "<svg" in html and "CLAIM 2024" in html and "TRIPOD+AI" in html
    card = card_path(settings, v).read_text()
    assert "## Evidence pack" in card and "evidence.html" in card
    assert mv.tags[EVIDENCE_TAG].endswith(f"evidence/v{v}/evidence.html")
    assert any(line.startswith(MARKER) for line in (mv.description or "").splitlines())
    assert artifact_exists(settings, mv.run_id, f"evidence/v{v}/evidence.json")


def test_pack_holds_no_phi_or_patient_ids(champion_project: Settings, tmp_path: Path) -> None:
    """Planted PHI in the dataset folder's side files and a password in the summary never reach the pack."""
    import pandas as pd

    settings, mv = champion_project, _champion(champion_project)
    data = tmp_path / "dataset"
    data.mkdir()
    for name in ("manifest.parquet", "split.parquet", "split_certificate.json", "ingest_summary.json"):
        shutil.copyfile(settings.dataset_dir / name, data / name)
    summary = json.loads((data / "ingest_summary.json").read_text())
    summary["source"] = "https://alice:Pw9QzSecret@pacs.example/export"
    (data / "ingest_summary.json").write_text(json.dumps(summary))
    (data / "excluded.csv").write_text(f"file,reason\n{PHI['PatientName']}.dcm,{PHI['AccessionNumber']}\n")
    (data / "patient_links.csv").write_text(f"{PHI['OtherPatientIDs']},{PHI['PatientBirthDate']}\n")

    text = json.dumps(build_pack(settings, mv.version, data))
    patients = pd.read_parquet(data / "manifest.parquet", columns=["patient_id", "path"])
    assert not [p for p in patients["patient_id"].unique() if p in text]
    assert not [p for p in patients["path"] if p in text]
    assert "Pw9QzSecret" not in text and "alice:***@pacs.example" in text
    out = tmp_path / "out.json"
    out.write_text(text)
    assert find_tokens([out, evidence_path(settings, mv.version, "html").parent], list(PHI.values())) == {}


def test_second_version_diffs_against_the_champion(champion_project: Settings) -> None:
    from tests.serving.helpers import gated_copy

    settings, champion = champion_project, _champion(champion_project)
    second = gated_copy(settings, champion)  # records a gate decision → pack refreshed
    pack = _load(settings, str(second.version))
    diff = pack["diff"]
    assert diff["champion_version"] == str(champion.version)
    assert diff["metrics"]["auc"]["delta"] == 0  # same run, same test scores
    assert diff["within_champion_envelope"] and not diff["envelope_breaches"]
    assert not diff["data"]["dataset_hash"]["changed"]
    status = {(i["standard"], i["item"]): i["status"] for i in pack["items"]}
    assert status[("TRIPOD+AI", "24")] == ANSWERED
    assert _load(settings, str(champion.version))["diff"] is None  # the first champion had nothing to compare


def test_cli_regenerates_and_reports_an_unknown_version(champion_project: Settings) -> None:
    from pipeline.cli import app

    settings, mv = champion_project, _champion(champion_project)
    params = str(settings.root / "params.yaml")
    path = evidence_path(settings, mv.version, "html")
    before = path.stat().st_mtime_ns
    result = CliRunner().invoke(app, ["registry", "evidence", str(mv.version), "--params", params])
    assert result.exit_code == 0, result.output
    assert str(path) in result.stdout and path.stat().st_mtime_ns >= before

    missing = CliRunner().invoke(app, ["registry", "evidence", "999", "--params", params])
    assert missing.exit_code == 2
    lines = [line for line in missing.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "no version 999" in lines[0]
    assert "Traceback" not in missing.output
    assert get_version(settings, mv.version)  # nothing else changed
