"""Process-wide set-up done once at an entry point (CLI, flow, API): never at import time.

- switches off telemetry and update checks of every tool (MLflow, Prefect, DVC, GX,
  Evidently, Streamlit, TensorFlow noise);
- (Prefect's own set-up, which imports Prefect, is :mod:`flows.environment`);
- configures logging once;
- imports TensorFlow without the native start-up noise it prints on CPU-only hosts
  (:func:`import_tensorflow_quietly`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

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
    "TF_CPP_MIN_LOG_LEVEL": "3",  # 2 still lets `failed call to cuInit … (303)` through at error level
    "KMP_WARNINGS": "0",
    "GIT_PYTHON_REFRESH": "quiet",
}


#: Warnings libraries log about conditions that are expected here, dropped at their logger: logger → message
#: prefixes. uv's virtual environments have no pip, so MLflow cannot pin it in a logged model's conda.yaml (it
#: writes plain ``pip``; the model's requirements.txt, which serving uses, is unaffected).
EXPECTED_WARNINGS = {
    "mlflow.utils.environment": ("Failed to resolve installed pip version",),
}


class _DropExpected(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_tools() -> None:
    """Turn off telemetry of every tool (does not override values the user set) and drop the library
    warnings of :data:`EXPECTED_WARNINGS` (each filter is added once)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name, prefixes in EXPECTED_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected(prefixes))


def configure_logging(level: str = "INFO", *, plain: bool = False) -> None:
    """Configure the root logger once: rich handler when available, or ``plain`` one-line records (servers whose
    output goes to a log collector: rich wraps at 80 columns when stderr is not a terminal)."""
    root = logging.getLogger()
    if getattr(root, "_xrayops_configured", False):
        return
    try:
        if plain:
            raise ImportError
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    except ImportError:
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("alembic", "urllib3", "httpx", "matplotlib", "PIL", "great_expectations", "absl", "h5py", "dvc",
                  "dvc_data", "dvc_objects", "scmrepo", "mlflow.store", "evidently"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root._xrayops_configured = True  # type: ignore[attr-defined]


# What TensorFlow's native code writes to fd 2 while it starts on a host without a GPU: absl's pre-init banner,
# info/warning records (oneDNN, "Could not find cuda drivers") and the cuInit (303) error. Nothing else is dropped.
_TF_STARTUP_NOISE = re.compile(r"All log messages before absl::InitializeLog|^[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
                               r"|cuInit|cudart_stub|cuda_platform|cuda_(?:dnn|fft|blas)\.cc")


@contextmanager
def native_stderr_filtered(noise: re.Pattern[str] = _TF_STARTUP_NOISE) -> Iterator[None]:
    """Send file descriptor 2 (native libraries write there, below Python) to a temporary file for the block,
    then replay every line that does not match ``noise`` to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not noise.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (and initialise its devices) with its CPU-host start-up noise filtered out; anything
    else it prints still reaches stderr. Call it at an entry point before anything else imports TensorFlow
    (after :func:`quiet_tools`). A missing TensorFlow is left for the code that needs it to report."""
    if "tensorflow" in sys.modules:
        return
    with native_stderr_filtered():
        try:
            import tensorflow as tf
        except ImportError:
            return
        tf.config.list_physical_devices()  # the CUDA probe (cuInit) happens here, inside the filter
