"""Checkpoint folders: a live run's folder (lock held) is never adopted nor cleaned; an interrupted one is."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.training.checkpoints import OWNER_FILE, claim_checkpoint_dir


def test_second_run_takes_its_own_folder_while_the_first_holds_its_lock(tmp_path: Path) -> None:
    with claim_checkpoint_dir(tmp_path, "cnn-abc") as first:
        (first.path / "run.json").write_text('{"run_id": "live"}')
        (first.path / "backup").mkdir()
        with claim_checkpoint_dir(tmp_path, "cnn-abc") as second:
            assert second.path == tmp_path / "cnn-abc.2" and not second.adopted
            assert not (second.path / "run.json").exists()
        assert not second.path.exists(), "a finished run removes its folder"
        assert (first.path / "run.json").read_text() == '{"run_id": "live"}' and (first.path / "backup").is_dir()
    assert not first.path.exists()


def test_an_interrupted_run_is_adopted_and_resumed(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), claim_checkpoint_dir(tmp_path, "cnn-abc") as first:
        (first.path / "run.json").write_text('{"run_id": "interrupted"}')
        raise KeyboardInterrupt
    assert (tmp_path / "cnn-abc" / "run.json").exists(), "an interrupted run keeps its state"
    with claim_checkpoint_dir(tmp_path, "cnn-abc") as again:
        assert again.path == tmp_path / "cnn-abc" and again.adopted
        assert (again.path / "run.json").read_text() == '{"run_id": "interrupted"}'


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.training.checkpoints import claim_checkpoint_dir
    with claim_checkpoint_dir(Path(sys.argv[1]), "cnn-abc") as held:
        (held.path / "run.json").write_text('{"run_id": "live"}')
        print(held.path, flush=True)
        sys.stdin.readline()  # hold the folder until the test says so
""")


def test_a_folder_held_by_another_process_is_skipped_until_that_process_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        held = Path(holder.stdout.readline().strip())
        assert held == tmp_path / "cnn-abc"
        with claim_checkpoint_dir(tmp_path, "cnn-abc") as mine:
            assert mine.path == tmp_path / "cnn-abc.2"
        assert (held / "run.json").exists() and str(holder.pid) in (held / OWNER_FILE).read_text()
    finally:
        holder.kill()  # dies holding the lock, like a killed training: the kernel releases it
        holder.wait(10)
    with claim_checkpoint_dir(tmp_path, "cnn-abc") as after:
        assert after.path == held and after.adopted, "a dead run's folder is free at once (no stale lock)"
