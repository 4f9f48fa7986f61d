"""pipeline.errors: its docstring tree names every error the module defines, under its real parent."""

from __future__ import annotations

import inspect
import re

import pipeline.errors as errors
from pipeline.errors import XrayopsError


def _defined() -> dict[str, type]:
    return {name: cls for name, cls in vars(errors).items()
            if inspect.isclass(cls) and issubclass(cls, XrayopsError) and cls.__module__ == errors.__name__}


def _tree() -> dict[str, str | None]:
    """Class name → the class one level up in the docstring's tree (None for the root)."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*)(?:[│ ]*[├└]── )?([A-Z]\w+)\b", line)
        if not m or ("──" not in line and m.group(2) != "XrayopsError"):
            continue
        depth = len(line) - len(line.lstrip(" │├└─"))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[m.group(2)] = stack[-1][1] if stack else None
        stack.append((depth, m.group(2)))
    return parents


def test_every_error_class_is_in_the_docstring_tree() -> None:
    tree = _tree()
    missing = sorted(set(_defined()) - set(tree))
    assert not missing, f"add to the tree in pipeline/errors.py's docstring: {missing}"
    assert not sorted(set(tree) - set(_defined())), "the tree names a class pipeline.errors does not define"


def test_the_tree_shows_each_class_under_a_base_it_derives_from() -> None:
    classes = _defined()
    for name, parent in _tree().items():
        if parent is not None:
            assert issubclass(classes[name], classes[parent]), f"{name} is drawn under {parent}, not derived from it"
