"""The code fingerprint in the ingest/validate cache keys covers exactly the stage's import closure:
editing any ``pipeline`` file the stage can import changes it, editing any other file does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.caching import INGEST_CODE, VALIDATE_CODE, code_fingerprint
from flows.codegraph import PROJECT_ROOT, closure, closure_files, fingerprint, module_files


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(PROJECT_ROOT / "pipeline", root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


@pytest.mark.parametrize("stage", [INGEST_CODE, VALIDATE_CODE], ids=["ingest", "validate"])
def test_editing_a_module_changes_the_fingerprint_iff_the_stage_imports_it(package_copy: Path, stage) -> None:
    inside = set(closure_files(stage, package_copy))
    every = {path.relative_to(package_copy) for path in module_files(package_copy).values()}
    outside = every - inside
    assert inside and outside
    before = fingerprint(stage, package_copy)
    for rel in sorted(every):
        path = package_copy / rel
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# edited\n")
            changed = fingerprint(stage, package_copy) != before
        finally:
            path.write_bytes(original)
        assert changed == (rel in inside), f"{rel}: fingerprint {'changed' if changed else 'unchanged'}"
    assert fingerprint(stage, package_copy) == before


def test_closure_holds_what_the_old_hand_lists_missed() -> None:
    for stage in (INGEST_CODE, VALIDATE_CODE):
        mods = closure(stage)
        assert {"pipeline", "pipeline.config", "pipeline.errors", "pipeline.data", stage[0]} <= mods
    assert "pipeline.data.features" in closure(INGEST_CODE)
    assert not any(m.startswith(("pipeline.training", "pipeline.serving")) for m in closure(VALIDATE_CODE))


def test_new_imports_join_the_closure(tmp_path: Path) -> None:
    """A function-level import added to a stage module brings the imported file into the fingerprint."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    target = Path("pipeline/monitoring/feedback.py")
    assert target not in closure_files(VALIDATE_CODE, root)
    validate = root / "pipeline/data/validate.py"
    late_import = "\n\ndef _late():\n    from pipeline.monitoring import feedback\n"
    validate.write_text(validate.read_text() + late_import)
    assert target in closure_files(VALIDATE_CODE, root)


def test_cache_key_uses_the_closure_of_the_repository() -> None:
    assert code_fingerprint(VALIDATE_CODE) == fingerprint(VALIDATE_CODE, PROJECT_ROOT)
    assert code_fingerprint(INGEST_CODE) != code_fingerprint(VALIDATE_CODE)
