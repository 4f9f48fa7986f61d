"""DVC versioning of raw datasets in a temp git + DVC repo with a local remote."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.data.ingest import prepare_raw
from pipeline.data.versioning import track
from pipeline.errors import VersioningError


def test_track_is_stable_and_pushes(dvc_project: Callable[..., Settings]) -> None:
    settings = dvc_project()
    prepare_raw(settings)
    first = track(settings.raw_dir, remote_url=settings.dvc_remote, push=True)
    second = track(settings.raw_dir, remote_url=settings.dvc_remote, push=True)
    assert first.dvc_md5 == second.dvc_md5 and first.dvc_md5.endswith(".dir")
    assert first.pushed and any(p.is_file() for p in (settings.home / "dvc-remote").rglob("*"))
    assert (settings.raw_dir.parent / "synthetic.dvc").is_file()


def test_changed_data_changes_the_hash(dvc_project: Callable[..., Settings]) -> None:
    settings = dvc_project()
    prepare_raw(settings)
    before = track(settings.raw_dir, remote_url=None, push=False)
    (settings.raw_dir / "NORMAL" / "extra.png").write_bytes((next(settings.raw_dir.rglob("*.png"))).read_bytes())
    after = track(settings.raw_dir, remote_url=None, push=False)
    assert before.dvc_md5 != after.dvc_md5


def test_outside_a_dvc_repo_is_a_clear_error(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    prepare_raw(settings)
    with pytest.raises(VersioningError, match="not inside a DVC repository.*dvc init"):
        track(settings.raw_dir, remote_url=None, push=False)


# --------------------------------------------------------------------------- dataset versions by rev


def _dataset_repo(root: Path) -> Path:
    """A git + DVC repo with a committed local remote and two tagged versions of ``data/raw/cxr``."""
    from dvc.repo import Repo

    from tests.conftest import init_git_dvc
    from tests.data.helpers import write_png

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)

    root.mkdir()
    init_git_dvc(root)
    with Repo(str(root)) as repo, repo.config.edit() as conf:
        conf["remote"]["store"] = {"url": str(root.parent / "remote")}
        conf["core"]["remote"] = "store"
    data = root / "data" / "raw" / "cxr"
    for version, indexes in (("v1", range(6)), ("v2", range(3, 12))):
        shutil.rmtree(data, ignore_errors=True)
        for i in indexes:
            label = "PNEUMONIA" if i % 3 == 0 else "NORMAL"
            write_png(data / label / f"img{i:02d}.png", i, positive=label == "PNEUMONIA")
        with Repo(str(root)) as repo:
            repo.add(str(data))
            repo.push()
        git("add", "-A")
        git("commit", "-qm", f"dataset {version}")
        git("tag", version)
    return root


def test_ingest_by_rev_gives_each_version_also_from_the_remote(make_settings: Callable[..., Settings],
                                                               tmp_path: Path) -> None:
    import pandas as pd

    from pipeline.data.ingest import run_ingest, version_raw

    repo = _dataset_repo(tmp_path / "datarepo")

    def ingest(rev: str, out: str) -> dict[str, object]:
        settings = make_settings("data.source=folder", f"data.repo={repo}", f"data.rev={rev}",
                                 "data.input=data/raw/cxr", f"data.dataset_dir={tmp_path / out}")
        return run_ingest(settings, version_raw(settings), show_progress=False)

    v1, v2 = ingest("v1", "ds1"), ingest("v2", "ds2")
    assert (v1["ingested"], v2["ingested"]) == (6, 9)
    assert v1["dvc_md5"] != v2["dvc_md5"] and v1["manifest_sha256"] != v2["manifest_sha256"]
    assert (v1["dvc_rev"], v2["dvc_rev"]) == ("v1", "v2") and v1["dataset_hash"] == v1["dvc_md5"]
    assert v1["dvc"]["commit"] != v2["dvc"]["commit"]
    m1 = set(pd.read_parquet(tmp_path / "ds1" / "manifest.parquet")["sha256"])
    m2 = set(pd.read_parquet(tmp_path / "ds2" / "manifest.parquet")["sha256"])
    assert m1 != m2 and len(m1 & m2) == 3

    shutil.rmtree(repo / ".dvc" / "cache")  # only the remote has the data now
    again = ingest("v1", "ds1-remote")
    assert again["dvc_md5"] == v1["dvc_md5"] and again["manifest_sha256"] == v1["manifest_sha256"]
    shutil.rmtree(tmp_path / "remote")  # and without the remote, v2 (not in any cache now) cannot be read
    with pytest.raises(VersioningError, match="pushed"):
        ingest("v2", "ds2-gone")


def test_cli_ingest_rev_from_another_repo(make_settings: Callable[..., Settings], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    repo = _dataset_repo(tmp_path / "datarepo")
    shutil.rmtree(repo / ".dvc" / "cache")
    settings = make_settings()
    monkeypatch.chdir(tmp_path)
    hashes = {}
    for rev in ("v1", "v2"):
        out = tmp_path / f"cli-{rev}"
        result = CliRunner().invoke(app, ["ingest", "--source", "folder", "--rev", rev, "--repo", str(repo),
                                          "--input", "data/raw/cxr", "--out", str(out),
                                          "--params", str(settings.root / "params.yaml")])
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "ingest_summary.json").read_text())
        assert summary["dvc_rev"] == rev and summary["dvc"]["repo"] == str(repo)
        hashes[rev] = (summary["dataset_hash"], summary["manifest_sha256"])
    assert hashes["v1"][0] != hashes["v2"][0] and hashes["v1"][1] != hashes["v2"][1]
    result = CliRunner().invoke(app, ["ingest", "--source", "folder", "--rev", "v9", "--repo", str(repo),
                                      "--input", "data/raw/cxr", "--out", str(tmp_path / "x"),
                                      "--params", str(settings.root / "params.yaml")])
    assert result.exit_code == 2 and "v9" in result.output
