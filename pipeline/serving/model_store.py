"""The served model: the version holding ``serve.model_alias``, reloaded when the alias moves.

A background thread checks the alias every ``serve.alias_poll_s`` seconds (and
:meth:`ModelStore.refresh` checks on demand). A new version is loaded *beside* the old
one and swapped in with one reference assignment, so a request that already holds a
:class:`~pipeline.serving.predictor.Predictor` finishes on the version it started with and no
request ever sees a half-loaded model. A version that fails to load leaves the old one
serving and the error visible in ``/readyz``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import Settings
from pipeline.errors import NotReady
from pipeline.serving.predictor import Predictor

logger = logging.getLogger(__name__)


class ModelStore:
    """Holds the current :class:`Predictor` for one alias of the registered model."""

    def __init__(self, settings: Settings, *, loader: Callable[..., Predictor] | None = None,
                 alias: str | None = None) -> None:
        from pipeline.serving.predictor import load_predictor

        self.settings = settings
        self.alias = alias or settings.serve.model_alias
        self._loader = loader or load_predictor
        self._current: Predictor | None = None
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.loaded_at: float | None = None

    @property
    def current(self) -> Predictor | None:
        return self._current

    def require(self) -> Predictor:
        predictor = self._current
        if predictor is None:
            raise NotReady(self.last_error or f"no model loaded yet for alias '{self.alias}'")
        return predictor

    def refresh(self) -> bool:
        """Check the alias now; load and swap in a moved version. Returns True when the model changed."""
        from pipeline.registry.read import get_alias

        with self._load_lock:
            self.last_check = time.time()
            try:
                version = get_alias(self.settings, self.alias)
            except Exception as exc:  # noqa: BLE001 - registry unreachable: keep serving what we have, say why
                self.last_error = f"registry check failed: {type(exc).__name__}: {str(exc)[:200]}"
                logger.warning("%s", self.last_error)
                return False
            if version is None:
                self.last_error = (f"no version of {self.settings.registered_model} holds alias '{self.alias}': "
                                   "promote a model first (`xrayops run` or `xrayops promote`)")
                return False
            current = self._current
            if current is not None and current.version == str(version.version):
                return False
            try:
                predictor = self._loader(self.settings, version, alias=self.alias)
            except Exception as exc:
                self.last_error = f"loading version {version.version} failed: {type(exc).__name__}: {str(exc)[:200]}"
                logger.exception("alias %s → v%s: load failed; still serving %s", self.alias, version.version,
                                 current.version if current else "nothing")
                return False
            self._current, self.loaded_at, self.last_error = predictor, time.time(), None
            logger.info("serving %s v%s (alias %s; was %s)", predictor.model_name, predictor.version, self.alias,
                        current.version if current else "none")
            return True

    def start(self) -> ModelStore:
        """Load now and start polling the alias."""
        self.refresh()
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="alias-poller", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.serve.alias_poll_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def status(self) -> dict[str, Any]:
        p = self._current
        return {"ready": p is not None, "alias": self.alias, "model_name": self.settings.registered_model,
                "version": p.version if p else None, "engine": getattr(p.engine, "name", None) if p else None,
                "last_check": self.last_check, "loaded_at": self.loaded_at, "error": self.last_error}
