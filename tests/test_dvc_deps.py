"""dvc.yaml names the code each stage runs: every ``pipeline`` module a stage's ``xrayops <verb>`` can
import (the verb's imports in ``pipeline/cli.py``, then their import closure, package ``__init__``s
included) is covered by one of the stage's deps, so ``dvc repro`` reruns a stage whose code changed."""

from __future__ import annotations

import pytest
import yaml

from flows.codegraph import PROJECT_ROOT, closure, function_imports, module_files

STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def cli_verb(cmd: str) -> str:
    words = cmd.split()
    assert words[0] == "xrayops", f"stage command {cmd!r} does not run the project's CLI"
    return words[1].replace("-", "_")


def stage_code(stage: dict) -> list[str]:
    """Source files (relative to the repository) of the stage command's import closure."""
    entries = function_imports("pipeline.cli", cli_verb(stage["cmd"]))
    assert entries, f"{stage['cmd']!r} imports no library module"
    mods = module_files()
    return sorted(mods[m].relative_to(PROJECT_ROOT).as_posix() for m in closure(entries))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_its_import_closure(name: str) -> None:
    stage = STAGES[name]
    deps = [str(d).rstrip("/") for d in stage.get("deps", [])]
    missing = [path for path in stage_code(stage) if not any(path == d or path.startswith(d + "/") for d in deps)]
    assert not missing, f"dvc stage {name}: add to deps (a folder when it uses most of it): {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_exist(name: str) -> None:
    code_deps = [d for d in STAGES[name].get("deps", []) if str(d).startswith(("pipeline", "flows"))]
    assert code_deps
    for dep in code_deps:
        assert (PROJECT_ROOT / dep).exists(), f"dvc stage {name}: dep {dep} does not exist"
