"""The served model: the verified version holding ``serve.model_alias``, reloaded when the alias moves.

A background thread checks the alias every ``serve.alias_poll_s`` seconds (and
:meth:`ModelStore.refresh` checks on demand). Every check verifies the version holding the alias
against what the promotion path recorded on it (:func:`pipeline.serving.trust.check_alias`: gate
decision, approval, champion lineage); an alias pointed at anything else is *not* loaded. A new
version is loaded *beside* the old one and swapped in with one reference assignment, so a request
that already holds a :class:`~pipeline.serving.predictor.Predictor` finishes on the version it
started with and no request ever sees a half-loaded model.

When a check fails the store keeps the last verified model and reports why (``reason``: a stable code
of :data:`pipeline.serving.trust.REASONS`, ``detail``: words for people, never exception text; the
exception goes to the log). It keeps *serving* that model, except when the alias is gone and
``serve.on_alias_missing`` is ``stop``. Versions are told apart by number *and* training run and
model source, so a registry recreated with the same version numbers is loaded afresh.

Each time the served version changes (a first load, a swap, a stop because the alias is gone,
:meth:`ModelStore.stop`) a ``serving_start`` / ``serving_stop`` record goes to the audit log
(:mod:`pipeline.audit`; best-effort: a failed write is logged and serving goes on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline import audit
from pipeline.config import Settings
from pipeline.errors import NotReady
from pipeline.serving.predictor import Predictor
from pipeline.serving.trust import ALIAS_MISSING, LOAD_FAILED, check_alias

logger = logging.getLogger(__name__)

NOT_READY = "model_not_ready"


def version_identity(version: Any) -> tuple[str, str | None, str | None]:
    """What makes a registry version the same model: number, training run and model source."""
    return str(version.version), getattr(version, "run_id", None), getattr(version, "source", None)


class ModelStore:
    """Holds the current :class:`Predictor` for one alias of the registered model."""

    def __init__(self, settings: Settings, *, loader: Callable[..., Predictor] | None = None,
                 alias: str | None = None) -> None:
        from pipeline.serving.predictor import load_predictor

        self.settings = settings
        self.alias = alias or settings.serve.model_alias
        self._loader = loader or load_predictor
        self._loaded: Predictor | None = None  # the last verified and loaded version
        self._identity: tuple[str, str | None, str | None] | None = None
        self._serving = False
        self._recorded: tuple[str, str | None, str | None] | None = None  # identity last audited as served
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_check: float | None = None
        self.loaded_at: float | None = None
        self.reason: str | None = NOT_READY
        self.detail: str | None = f"no model loaded yet for alias '{self.alias}'"

    @property
    def current(self) -> Predictor | None:
        """The model requests are answered with (None: nothing is served)."""
        return self._loaded if self._serving else None

    @property
    def ready(self) -> bool:
        """A model is served and the last check verified it is the one the alias names."""
        return self._serving and self.reason is None

    def require(self) -> Predictor:
        """The served model.

        Raises:
            NotReady: nothing is served; ``reason`` is the stable code, the message says why.
        """
        predictor = self.current
        if predictor is None:
            raise NotReady(self.detail or f"no model loaded yet for alias '{self.alias}'",
                           reason=self.reason or NOT_READY)
        return predictor

    def refresh(self) -> bool:
        """Check the alias now; verify, load and swap in a moved version. Returns True when the model changed."""
        with self._load_lock:
            changed = self._check()
            self._record_serving()
            return changed

    def _check(self) -> bool:
        self.last_check = time.time()
        verdict = check_alias(self.settings, self.alias)
        if not verdict.trusted:
            self._problem(verdict.reason or NOT_READY, verdict.detail)
            return False
        version = verdict.version
        if self._loaded is not None and self._identity == version_identity(version):
            self._ok()
            return False
        try:
            predictor = self._loader(self.settings, version, alias=self.alias)
        except Exception:
            logger.exception("alias %s → v%s: load failed; still serving %s", self.alias, version.version,
                             self._describe())
            self._problem(LOAD_FAILED, f"{self.settings.registered_model} v{version.version} holds alias "
                          f"'{self.alias}' and is verified but could not be loaded (see the server log)")
            return False
        previous = self._describe()
        first = self._loaded is None
        self._loaded, self._identity, self.loaded_at = predictor, version_identity(version), time.time()
        self._ok()
        # the first load is announced by the entry point (the API's start-up line); a swap is news
        logger.log(logging.DEBUG if first else logging.INFO, "serving %s v%s (alias %s, engine %s, threshold %s; "
                   "was %s)", predictor.model_name, predictor.version, self.alias,
                   getattr(getattr(predictor, "engine", None), "name", "?"), getattr(predictor, "threshold", None),
                   previous)
        return True

    def _record_serving(self, why: str | None = None) -> None:
        """Audit a change of the served model: ``serving_stop`` of the old one, ``serving_start`` of the new."""
        served = self._identity if self.current is not None else None
        if served == self._recorded:
            return
        if self._recorded is not None:
            audit.record_serving(self.settings, audit.SERVING_STOP, self._recorded[0],
                                 {"alias": self.alias, "why": why or self.reason or "replaced"})
        if served is not None:
            audit.record_serving(self.settings, audit.SERVING_START, served[0],
                                 {"alias": self.alias, "run_id": served[1],
                                  "replaces": self._recorded[0] if self._recorded else None})
        self._recorded = served

    def _describe(self) -> str:
        return f"v{self._loaded.version}" if self._loaded is not None else "nothing"

    def _ok(self) -> None:
        self._serving, self.reason, self.detail = True, None, None

    def _problem(self, reason: str, detail: str) -> None:
        stop = reason == ALIAS_MISSING and self.settings.serve.on_alias_missing == "stop"
        self._serving = self._loaded is not None and not stop
        if self._loaded is None:
            tail = "nothing is served"
        elif stop:
            tail = f"serving v{self._loaded.version} stopped (serve.on_alias_missing=stop)"
        else:
            tail = f"still serving v{self._loaded.version}, the last verified version"
        detail = f"{detail} — {tail}"
        if (reason, detail) != (self.reason, self.detail):
            logger.warning("alias %s: %s: %s", self.alias, reason, detail)
        self.reason, self.detail = reason, detail

    def start(self) -> ModelStore:
        """Load now and start polling the alias."""
        self.refresh()
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="alias-poller", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.serve.alias_poll_s):
            try:
                self.refresh()
            except Exception:  # the poller must survive anything; the next poll tries again
                logger.exception("alias check failed unexpectedly")

    def stop(self) -> None:
        """Stop polling and serving (the server shuts down)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._load_lock:
            self._serving = False
            self._record_serving("shutdown")

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` reports."""
        p = self.current
        return {"ready": self.ready, "serving": p is not None, "alias": self.alias,
                "model_name": self.settings.registered_model, "version": p.version if p else None,
                "engine": getattr(p.engine, "name", None) if p else None, "last_check": self.last_check,
                "loaded_at": self.loaded_at, "reason": self.reason, "detail": self.detail}
