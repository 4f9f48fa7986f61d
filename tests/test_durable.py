"""pipeline.durable.write_atomic: the file appears whole with its mode, or the old one stays; no temp file is left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.durable import write_atomic


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_writes_the_content_with_the_mode_and_leaves_no_temp_file(tmp_path: Path, mode: int) -> None:
    dest = tmp_path / "sub" / "record.json"
    assert write_atomic(dest, b'{"a": 1}', mode=mode) == dest
    assert dest.read_bytes() == b'{"a": 1}'
    assert _mode(dest) == mode & ~_umask()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["record.json"]


def test_replaces_an_existing_file_whole(tmp_path: Path) -> None:
    dest = tmp_path / "cursor"
    dest.write_bytes(b"old")
    write_atomic(dest, b"new contents", mode=0o600)
    assert dest.read_bytes() == b"new contents" and _mode(dest) == 0o600 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["cursor"]


def test_a_failure_while_writing_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    dest = tmp_path / "outbox.json"
    dest.write_bytes(b"old")
    with pytest.raises(TypeError):  # fails inside the write, after the temp file was created
        write_atomic(dest, "not bytes", temp_suffix=".part")  # type: ignore[arg-type]
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["outbox.json"]


def test_a_disk_error_at_fsync_leaves_the_old_file_and_no_temp_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "links.json"
    dest.write_bytes(b"old")

    def disk_error(fd: int) -> None:  # the system edge: the disk refuses to flush
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_error)
    with pytest.raises(OSError, match="Input/output"):
        write_atomic(dest, b"new")
    monkeypatch.undo()
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["links.json"]
