"""Process-wide set-up done once at an entry point (CLI, flow, API): never at import time.

- switches off telemetry and update checks of every tool (MLflow, Prefect, DVC, GX,
  Evidently, Streamlit, TensorFlow noise);
- (Prefect's own set-up, which imports Prefect, is :mod:`flows.environment`);
- configures logging once.
"""

from __future__ import annotations

import logging
import os

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "DVC_IGNORE_UPDATES": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
    "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    "HF_HUB_OFFLINE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "KMP_WARNINGS": "0",
    "GIT_PYTHON_REFRESH": "quiet",
}


def quiet_tools() -> None:
    """Turn off telemetry of every tool (does not override values the user set)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def configure_logging(level: str = "INFO") -> None:
    """Configure the root logger once (rich handler when available)."""
    root = logging.getLogger()
    if getattr(root, "_xrayops_configured", False):
        return
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("alembic", "urllib3", "httpx", "matplotlib", "PIL", "great_expectations", "absl", "h5py", "dvc",
                  "dvc_data", "dvc_objects", "scmrepo", "mlflow.store", "evidently"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root._xrayops_configured = True  # type: ignore[attr-defined]
