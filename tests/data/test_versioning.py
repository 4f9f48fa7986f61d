"""DVC versioning of raw datasets in a temp git + DVC repo with a local remote."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.config import Settings
from pipeline.data.versioning import VersioningError, track
from pipeline.ingest import prepare_raw

pytestmark = pytest.mark.data


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
