"""The CLI contract on every source layout, run from a folder outside the project:
``xrayops ingest --source NAME --input PATH [--labels CSV] --out DIR``, ``xrayops validate DIR``,
``xrayops split DIR`` — with traps: patients spread over the source's own splits, corrupt
files, duplicates under two patients, PHI in DICOM headers and in file names."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.deid import pseudonymise
from tests.data.helpers import find_tokens
from tests.data.layouts import BUILDERS, Layout

REPO = Path(__file__).resolve().parents[2]


def _salt() -> bytes:
    return os.environ["XRAYOPS_PSEUDONYM_SALT"].encode()


def check_outputs(layout: Layout, out: Path, console: str) -> None:
    """What every layout must satisfy after ingest → validate → split."""
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["ingested"] + summary["quarantined"] == summary["files_seen"]
    assert summary["quarantine_reasons"] == layout.reasons
    assert summary["excluded_by_label_mapping"] == layout.excluded
    if summary.get("labels_csv", {}).get("threshold_applies"):  # the CSV names files: every mismatch counted
        assert summary["labels_csv"]["files_without_row"] == layout.files_without_row
    with open(out / "quarantine.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["quarantined"] and all(r["reason"] and r["path"].startswith("q") for r in rows)

    cert = json.loads((out / "split_certificate.json").read_text())
    table = pd.read_parquet(out / "split.parquet")
    assert cert["patient_overlap"] == 0 and table.groupby("patient_id")["split"].nunique().max() == 1
    assert cert["exact_duplicates_across_splits"] == [] and cert["near_duplicates_across_splits"] == []
    split_of = table.groupby("patient_id")["split"].first()
    for group in layout.together:
        present = [pseudonymise(p, _salt()) for p in group if pseudonymise(p, _salt()) in split_of.index]
        assert present, f"none of {group} reached the split"
        assert split_of[present].nunique() == 1, f"{group} split across {set(split_of[present])}"

    assert (out / "validation" / "result.json").is_file()
    assert (out / "validation" / "data_docs" / "index.html").is_file()
    assert not find_tokens([out], layout.secrets), "identifying strings leaked into the outputs"
    assert not [s for s in layout.secrets if s.lower() in console.lower()], "identifying strings in the CLI output"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_cli_ingest_validate_split_from_another_cwd(name: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    layout = BUILDERS[name](tmp_path / "raw")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("XRAYOPS_PARAMS", raising=False)
    out = tmp_path / "datasets" / "trap"
    console = ""
    for args in (layout.cli_args(out), ["validate", str(out)], ["split", str(out)]):
        result = CliRunner().invoke(app, args)
        console += result.output
        assert result.exit_code == 0, f"{args[0]} exited {result.exit_code}: {result.output[-2000:]}"
    check_outputs(layout, out, console)
    assert list(elsewhere.iterdir()) == []  # nothing written to the current folder


def test_kaggle_patient_in_source_train_and_test_is_grouped(tmp_path: Path) -> None:
    layout = BUILDERS["kaggle-pneumonia"](tmp_path / "raw")
    out = tmp_path / "ds"
    assert CliRunner().invoke(app, layout.cli_args(out)).exit_code == 0
    assert CliRunner().invoke(app, ["split", str(out)]).exit_code == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    person1 = manifest[manifest["patient_id"] == pseudonymise("person1", _salt())]
    assert set(person1["source_split"]) == {"train", "test"}  # shipped in two of the source's splits
    table = pd.read_parquet(out / "split.parquet")
    assert table[table["patient_id"] == pseudonymise("person1", _salt())]["split"].nunique() == 1


def test_validate_exits_1_on_truly_broken_data(tmp_path: Path) -> None:
    layout = BUILDERS["folder"](tmp_path / "raw")
    out = tmp_path / "ds"
    assert CliRunner().invoke(app, layout.cli_args(out)).exit_code == 0
    df = pd.read_parquet(out / "manifest.parquet")
    df.loc[df.index[:2], "label"] = None
    df.to_parquet(out / "manifest.parquet", index=False)
    result = CliRunner().invoke(app, ["validate", str(out)])
    assert result.exit_code == 1 and "expect_column_values_to_not_be_null(label)" in result.output


def test_cli_errors_for_people(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ingest", "--source", "nih-cxr14", "--input", str(tmp_path / "missing"),
                                      "--out", str(tmp_path / "ds")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Expected layout" in result.output
    result = CliRunner().invoke(app, ["ingest", "--source", "nope", "--input", str(tmp_path), "--out",
                                      str(tmp_path / "ds")])
    assert result.exit_code == 2 and "kaggle-pneumonia" in result.output


@pytest.mark.slow
def test_installed_cli_runs_from_any_cwd(tmp_path: Path, make_settings: Callable[..., object]) -> None:
    """Real processes (as the outside check runs them): the console script, cwd outside the project."""
    layout = BUILDERS["rsna-pneumonia"](tmp_path / "raw")
    out = tmp_path / "out dir" / "rsna"
    exe = Path(sys.executable).with_name("xrayops")
    env = {k: v for k, v in os.environ.items() if k != "XRAYOPS_PARAMS"}
    console = ""
    for args in (layout.cli_args(out), ["validate", str(out)], ["split", str(out)]):
        proc = subprocess.run([str(exe), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        console += proc.stdout + proc.stderr
        assert proc.returncode == 0, proc.stderr[-2000:]
    check_outputs(layout, out, console)
    assert not (REPO / "data" / "datasets" / "rsna-pneumonia").exists()
