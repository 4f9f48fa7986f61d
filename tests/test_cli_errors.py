"""Every command, driven into its main failure, says so in one line (+ a hint) and exits 1 or 2 — no traceback.

Fast cases run in this process (CliRunner); the environment they touch (PREFECT_*, XRAYOPS_*) is
restored after each. Cases that run a Prefect flow on a temporary server run as a subprocess (the
flow's own logging is part of what the person sees) and are marked slow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import TINY, write_params

NO_SERVER = "http://127.0.0.1:9"  # the discard port: connection refused at once
PREFECT_NO_SERVER = f"{NO_SERVER}/api"
MLFLOW_UNREACHABLE = f"MLflow tracking server at {NO_SERVER} is not reachable (connection refused)"
PREFECT_UNREACHABLE = f"Prefect server at {PREFECT_NO_SERVER} (PREFECT_API_URL) is not reachable (connection refused)"

# (id, argv with {root} = a fresh project folder, environment changes (None = unset), exit code,
#  fragments of the error line, fragment of the hint line or None)
CASES: list[tuple[str, list[str], dict[str, str | None], int, list[str], str | None]] = [
    ("ingest-missing-input", ["ingest", "--source", "folder", "--input", "{root}/missing", "--out", "{root}/out"],
     {}, 2, ["{root}/missing does not exist", "Expected layout"], None),
    ("ingest-dicomweb-no-pacs", ["ingest", "--source", "dicomweb", "--url", f"{NO_SERVER}/dicom-web", "--labels",
                                 "{root}/labels.csv", "--input", "{root}/pull", "--out", "{root}/out"], {}, 2,
     [f"PACS (DICOMweb) at {NO_SERVER}/dicom-web is not reachable (connection refused)"], "data.dicomweb.url"),
    ("ingest-dicomweb-bad-study-filter", ["ingest", "--source", "dicomweb", "--url", f"{NO_SERVER}/dicom-web",
                                          "--study-filter", "ModalitiesInStudy"], {}, 2,
     ["--study-filter 'ModalitiesInStudy' is not KEY=VALUE"], None),
    ("ingest-dicomweb-no-url", ["ingest", "--source", "dicomweb", "--input", "{root}/pull"], {}, 2,
     ["no PACS URL: set data.dicomweb.url or pass --url"], None),
    ("validate-empty-folder", ["validate", "{root}/empty"], {}, 2,
     ["{root}/empty/manifest.parquet not found", "run `xrayops ingest"], None),
    ("split-without-manifest", ["split", "{root}/empty"], {}, 2, ["{root}/empty/manifest.parquet not found"], None),
    ("train-without-split", ["train"], {}, 2, ["split_certificate.json not found", "run `xrayops split"], None),
    ("evaluate-without-model", ["evaluate"], {}, 2, ["train.json not found", "run `xrayops train` first"], None),
    ("promote-without-model", ["promote"], {}, 2, ["train.json not found", "run `xrayops train` first"], None),
    ("data-generate-outside-git", ["data", "generate", "--set", "data.synthetic.n_patients=4"], {}, 2,
     ["is not inside a DVC repository", "data.version_with_dvc=false"], None),
    ("model-describe-unknown", ["model", "describe", "nope"], {}, 2,
     ["unknown model 'nope'", "xrayops model list"], None),
    ("quarantine-locate-no-csv", ["quarantine", "locate", "{root}/empty", "--input", "{root}/empty"], {}, 2,
     ["{root}/empty/quarantine.csv not found", "run `xrayops ingest --out {root}/empty`"], None),
    ("quarantine-locate-unknown-ref", ["quarantine", "locate", "{root}/ds", "--input", "{root}/raw"], {}, 2,
     ["none of the 1 quarantined files was found under {root}/raw"], "pseudonymisation salt"),
    ("serve-without-api-key", ["serve"], {"XRAYOPS_API_KEY": None}, 2,
     ["$XRAYOPS_API_KEY is not set", "serve.require_api_key"], None),
    ("ui-bad-override", ["ui", "--set", "serve.nope=1"], {}, 2, ["serve.nope"], None),
    ("ui-no-sign-in-off-loopback", ["ui", "--host", "0.0.0.0", "--set", "ui.auth=none"], {}, 2,
     ["refusing to serve the clinician app on 0.0.0.0 without sign-in"], "ui.auth=local"),
    ("ui-sign-in-without-users", ["ui"], {}, 2, ["holds no user with a password"],
     "xrayops ui users add NAME --role clinician"),
    ("ui-users-add-no-password-on-stdin", ["ui", "users", "add", "alice", "--password-stdin"], {}, 2,
     ["--password-stdin: no password on the first line of stdin"], "--password-stdin"),
    ("ui-users-list-open-file", ["ui", "users", "list", "--set", "ui.users_file={root}/ds/quarantine.csv"], {}, 2,
     ["can be read or written by other users"], "chmod 600"),
    ("ui-users-remove-unknown", ["ui", "users", "remove", "nobody"], {}, 2, ["no user 'nobody'"],
     "xrayops ui users list"),
    ("feedback-ingest-nothing", ["feedback", "ingest"], {}, 2,
     ["no clinician feedback under {root}/.xrayops/feedback", "nothing to ingest"], "xrayops ui"),
    *[(f"registry-{cmd[0]}-no-mlflow", ["registry", *cmd, "--set", f"paths.mlflow_tracking_uri={NO_SERVER}",
                                        "--set", "promote.registry_write_limit=registry-write"], {}, 2,
       [MLFLOW_UNREACHABLE], "mlflow server --host 127.0.0.1 --port 9")
      for cmd in (["show"], ["approve", "1", "--reviewer", "me"], ["rollback", "--reason", "test"], ["card", "1"],
                  ["evidence", "1"])],
    ("registry-approve-shared-without-limit", ["registry", "approve", "1", "--reviewer", "me", "--set",
                                               f"paths.mlflow_tracking_uri={NO_SERVER}"], {}, 2,
     ["is shared (other machines can write to it) and promote.registry_write_limit is null"],
     "promote.registry_write_limit: registry-write"),
    ("run-no-prefect", ["run"], {"PREFECT_API_URL": PREFECT_NO_SERVER}, 2, [PREFECT_UNREACHABLE],
     "unset it to run the flow on a temporary local server"),
    ("monitor-no-prefect", ["monitor"], {"PREFECT_API_URL": PREFECT_NO_SERVER}, 2, [PREFECT_UNREACHABLE],
     "prefect server start"),
    ("monitor-ui-workspace-is-a-file", ["monitor", "ui", "--workspace", "{root}/ds/quarantine.csv"], {}, 2,
     ["Evidently workspace {root}/ds/quarantine.csv is not a folder"], "monitor.workspace"),
    ("deploy-no-prefect", ["deploy"], {"PREFECT_API_URL": PREFECT_NO_SERVER}, 2, [PREFECT_UNREACHABLE],
     "prefect server start"),
    ("deploy-unset-prefect", ["deploy"], {"PREFECT_API_URL": None}, 2, ["PREFECT_API_URL is not set"],
     "export PREFECT_API_URL="),
    ("trigger-no-prefect", ["trigger", "training"], {"PREFECT_API_URL": PREFECT_NO_SERVER}, 2, [PREFECT_UNREACHABLE],
     "prefect server start"),
    ("trigger-unset-prefect", ["trigger", "training"], {"PREFECT_API_URL": None}, 2,
     ["PREFECT_API_URL is not set"], "export PREFECT_API_URL="),
    ("worker-no-prefect", ["worker"], {"PREFECT_API_URL": PREFECT_NO_SERVER}, 2, [PREFECT_UNREACHABLE],
     "prefect server start"),
    ("worker-unset-prefect", ["worker"], {"PREFECT_API_URL": None}, 2, ["PREFECT_API_URL is not set"],
     "export PREFECT_API_URL="),
    ("pacs-process-no-pacs", ["pacs", "process", "--url", f"{NO_SERVER}/dicom-web", "--study", "1.2.3"], {}, 2,
     [f"PACS (DICOMweb) at {NO_SERVER}/dicom-web is not reachable (connection refused)"], None),
    ("pacs-listen-no-orthanc", ["pacs", "listen", "--url", f"{NO_SERVER}/dicom-web", "--once"], {}, 2,
     [f"Orthanc at {NO_SERVER} is not reachable (connection refused)"], "pacs.orthanc_url"),
    *[(f"audit-{cmd}-missing-log", ["audit", cmd, "--path", "{root}/missing.jsonl"], {}, 2,
       ["no audit log at {root}/missing.jsonl"], None) for cmd in ("verify", "show")],
]

# commands (as `xrayops --help` lists them, sub-apps as "app command") that cannot fail on purpose
CANNOT_FAIL = {"version", "model list"}
NO_PARAMS_OPTION = {"model describe", "trigger"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A tiny project (not a git/DVC repository) with an empty folder and a one-entry quarantine."""
    write_params(tmp_path, TINY)
    (tmp_path / "empty").mkdir()
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.png").write_bytes(b"not the quarantined file")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "quarantine.csv").write_text("path,reason,detail\nq0123456789abcdef.png,corrupt,x\n")
    return tmp_path


@pytest.fixture
def restore_environment() -> Iterator[None]:
    """Commands set process-wide state (PREFECT_* defaults, log filters): undo it after each case."""
    saved = dict(os.environ)
    handlers = {h: list(h.filters) for h in logging.getLogger().handlers}
    yield
    os.environ.clear()
    os.environ.update(saved)
    for handler, filters in handlers.items():
        handler.filters[:] = filters


def error_lines(output: str) -> tuple[str, str | None]:
    """The one ``error:`` line and the ``hint:`` line right after it (None when there is none)."""
    lines = output.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, output
    hints = [i for i, line in enumerate(lines) if line.startswith("hint:")]
    assert hints in ([], [errors[0] + 1]), output
    return lines[errors[0]], lines[hints[0]] if hints else None


@pytest.mark.parametrize(("argv", "env", "code", "fragments", "hint"),
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_main_failure_is_one_line(project: Path, restore_environment: None, argv: list[str],
                                  env: dict[str, str | None], code: int, fragments: list[str],
                                  hint: str | None) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    args = [a.format(root=project) for a in argv]
    if argv[0] not in NO_PARAMS_OPTION and " ".join(argv[:2]) not in NO_PARAMS_OPTION:
        args += ["--params", str(project / "params.yaml")]
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    error, hint_line = error_lines(result.output)
    for fragment in fragments:
        assert fragment.format(root=project) in error, error
    if hint is not None:
        assert hint_line is not None and hint in hint_line, result.output


def test_every_command_has_a_failure_case() -> None:
    import typer.main

    group = typer.main.get_command(app)
    commands: set[str] = set()
    apps: set[str] = set()
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        sub = getattr(command, "commands", None)
        if sub:
            apps.add(name)
        commands |= {f"{name} {s}" for s in sub} if sub else {name}
    covered = {" ".join(argv[:2]) if argv[0] in apps else argv[0] for _, argv, *_ in CASES}
    assert commands - CANNOT_FAIL <= covered, sorted(commands - CANNOT_FAIL - covered)


def test_password_in_the_tracking_uri_is_masked(project: Path, restore_environment: None) -> None:
    uri = "http://bob:hunter2@127.0.0.1:9"
    result = CliRunner().invoke(app, ["registry", "show", "--set", f"paths.mlflow_tracking_uri={uri}",
                                      "--params", str(project / "params.yaml")])
    assert result.exit_code == 2, result.output
    error, _ = error_lines(result.output)
    assert "http://bob:***@127.0.0.1:9 is not reachable" in error and "hunter2" not in result.output


def test_prefect_password_is_masked(project: Path, restore_environment: None) -> None:
    os.environ["PREFECT_API_URL"] = "http://bob:hunter2@127.0.0.1:9/api"
    result = CliRunner().invoke(app, ["deploy", "--params", str(project / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert "http://bob:***@127.0.0.1:9/api" in error_lines(result.output)[0] and "hunter2" not in result.output


def xrayops(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    """``xrayops ARGS --params ROOT/params.yaml`` in a fresh process (a temporary Prefect server for flows)."""
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--params", str(root / "params.yaml")],
                          capture_output=True, text=True, cwd=root, env=environment, timeout=300)


@pytest.mark.slow
def test_run_with_a_missing_folder_prints_no_flow_traceback(project: Path) -> None:
    """The flow fails inside a task; Prefect logs it (without the traceback of an expected error) and the command
    ends with the one line."""
    out = xrayops("run", "--set", "data.source=folder", "--set", f"data.input={project / 'missing'}",
                  "--set", "data.version_with_dvc=false", root=project)
    output = out.stdout + out.stderr
    assert out.returncode == 2, output
    assert "Traceback" not in output, output
    assert f"{project / 'missing'} does not exist" in error_lines(output)[0]


@pytest.mark.slow
def test_monitor_without_a_champion_fails(project: Path) -> None:
    out = xrayops("monitor", root=project)
    output = out.stdout + out.stderr
    assert out.returncode == 2, output
    assert "Traceback" not in output, output
    assert "holds alias 'champion'" in error_lines(output)[0]


def test_data_generate_in_a_dvc_folder_without_git(project: Path, restore_environment: None) -> None:
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text("")
    result = CliRunner().invoke(app, ["data", "generate", "--set", "data.synthetic.n_patients=4",
                                      "--params", str(project / "params.yaml")])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, result.output
    error, hint = error_lines(result.output)
    assert f"cannot open the DVC repository {project}" in error and "not a git repository" in error
    assert hint is not None and "git init" in hint
