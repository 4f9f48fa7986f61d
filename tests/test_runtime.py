"""Library warnings about conditions that are expected here are dropped at their logger; others still show."""

from __future__ import annotations

import logging

import pytest


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_mlflows_missing_pip_warning_is_dropped_and_other_warnings_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """uv's virtual environments have no pip: MLflow warns on every logged model. (MLflow's loggers do not
    propagate to the root, so the records are collected on the logger itself.)"""
    from mlflow.utils import environment

    from pipeline.runtime import quiet_tools

    installed = environment._get_package_version
    # the condition, whatever this environment holds: pip is not installed (the system edge MLflow probes)
    monkeypatch.setattr(environment, "_get_package_version", lambda name: None if name == "pip" else installed(name))
    quiet_tools()
    quiet_tools()  # idempotent: one filter
    logger = logging.getLogger("mlflow.utils.environment")
    assert len(logger.filters) == 1
    collect = Collect()
    logger.addHandler(collect)
    try:
        env = environment._mlflow_conda_env(additional_pip_deps=["numpy"])  # the real call that warns
        logger.warning("another warning from MLflow")
    finally:
        logger.removeHandler(collect)
    assert "pip" in env["dependencies"]
    assert not any(m.startswith("Failed to resolve installed pip version") for m in collect.messages), collect.messages
    assert collect.messages == ["another warning from MLflow"]
