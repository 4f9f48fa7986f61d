"""The CLI starts fast (no heavy imports) and fails with one-line, actionable errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import REPO


def test_help_imports_no_heavy_library() -> None:
    code = ("import sys, pipeline.cli as c\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'mlflow', 'prefect', 'great_expectations', 'evidently', 'dvc')"
            " if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_help_lists_the_stage_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "ingest", "validate", "split", "train", "evaluate", "promote", "version"):
        assert command in result.output


def test_bad_override_is_one_clear_line() -> None:
    result = CliRunner().invoke(app, ["validate", "--params", str(REPO / "params.yaml"), "--set", "trian.x=1"])
    assert result.exit_code == 2
    assert "unknown section 'trian'" in result.output
    assert "Traceback" not in result.output


def test_missing_data_folder_names_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = CliRunner().invoke(app, ["ingest", "--params", str(REPO / "params.yaml"), "--source", "folder",
                                      "--input", str(missing), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert str(missing) in result.output and "Expected layout" in result.output


def test_unknown_source_lists_choices(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ingest", "--params", str(REPO / "params.yaml"), "--source", "nope",
                                      "--input", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown data.source 'nope'" in result.output and "synthetic" in result.output


def test_validate_without_manifest_says_run_ingest(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path), "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 2
    assert "run `xrayops ingest" in result.output


def test_deploy_without_a_server_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = CliRunner().invoke(app, ["deploy", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert "PREFECT_API_URL is not set" in result.output and "Traceback" not in result.output
