"""Import hygiene of ``pipeline`` and ``flows``, from a static import graph (:mod:`flows.codegraph`) and
fresh interpreters: every module imports on its own (no import-order dependence), no module imports
itself back through others (no cycles), and the library stays free of Prefect (only its CLI wires flows)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from flows.codegraph import PROJECT_ROOT, external_imports, find_cycles, import_graph, module_files

PACKAGES = ("pipeline", "flows")
MODULES = module_files(PROJECT_ROOT, PACKAGES)
# third-party packages that take a second or more to import: a module that imports one when it is
# imported (not only inside functions) is checked in the slow tier
HEAVY = {"tensorflow", "keras", "prefect", "prefect_dask", "mlflow", "great_expectations", "evidently",
         "pandas", "pyarrow", "sklearn", "scipy", "matplotlib", "streamlit", "fastapi", "uvicorn",
         "onnx", "onnxruntime", "tf2onnx", "dvc", "pydicom", "dask", "distributed"}


def _light_modules() -> set[str]:
    """Modules whose import (theirs and that of the project modules they import eagerly) loads nothing in HEAVY."""
    eager = import_graph(PROJECT_ROOT, PACKAGES, eager=True)
    direct = {m for m in MODULES if external_imports(m, MODULES, eager=True) & HEAVY}
    heavy, changed = set(direct), True
    while changed:
        grown = {m for m in MODULES if eager[m] & heavy or any(p in heavy for p in _packages_above(m))}
        changed = not grown <= heavy
        heavy |= grown
    return set(MODULES) - heavy


def _packages_above(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


LIGHT = sorted(_light_modules())
HEAVY_MODULES = sorted(set(MODULES) - set(LIGHT))


def _import_alone(module: str) -> tuple[str, int, str]:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    last_line = (proc.stderr.strip().splitlines() or [""])[-1]
    return module, proc.returncode, last_line


def _assert_each_imports_alone(modules: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:  # one fresh interpreter per module
        failures = [f"{m}: {err}" for m, rc, err in pool.map(_import_alone, modules) if rc != 0]
    assert not failures, "modules that fail to import in a fresh interpreter:\n" + "\n".join(failures)


def test_light_modules_import_alone() -> None:
    assert len(LIGHT) > 20, LIGHT
    _assert_each_imports_alone(LIGHT)


@pytest.mark.slow
def test_heavy_modules_import_alone() -> None:
    _assert_each_imports_alone(HEAVY_MODULES)


def test_no_import_cycles() -> None:
    """Function-level imports count too: a lazy import still ties the two modules together."""
    cycles = find_cycles(import_graph(PROJECT_ROOT, PACKAGES))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_cycle_detector_finds_a_planted_cycle() -> None:
    """The detector itself, on a made-up graph: a three-module cycle with an acyclic tail, a second
    two-module cycle, and an edge to a module outside the graph (ignored)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "outside"}, "d": {"a"}, "x": {"y"}, "y": {"x"}, "z": set()}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["x", "y", "x"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_library_does_not_import_prefect_or_flows() -> None:
    library = module_files(PROJECT_ROOT, ("pipeline",))
    offenders = {}
    for module in library:
        if module == "pipeline.cli":  # the CLI runs the flows
            continue
        bad = {name for name in external_imports(module, library) if name == "flows" or name.startswith("prefect")}
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, f"pipeline/ must not import Prefect or flows (only pipeline/cli.py may): {offenders}"


def test_graph_sees_function_level_imports() -> None:
    graph = import_graph(PROJECT_ROOT, PACKAGES)
    assert "flows.training" in graph["pipeline.cli"]  # imported inside the `run` command only
    assert "pipeline.training.models.catalogue" in graph["pipeline.training.models.zoo"]
