"""Which registry version serving may load: the trust check behind :class:`~pipeline.serving.model_store.ModelStore`.

Anyone who can write to MLflow can point an alias at any version (``set_registered_model_alias``).
Serving therefore does not trust the alias alone: it loads the version only when what the
pipeline recorded on it (:mod:`pipeline.registry.contract`) shows it got there through the
promotion path. :func:`judge` is the rule (pure); :func:`check_alias` reads the evidence.

What is verified, and what a failure is reported as (a stable reason code):

- ``champion_not_gated``: the version's gate verdict tag is ``pass`` *and* its recorded decision
  (run artifact ``gate/decision-v<N>.json``) agrees: it decided to promote, names this model and
  this version, and names the same compared champion as the ``gate_champion`` tag. A verdict tag
  flipped by hand, or a version that was never gated, fails here.
- ``champion_not_approved``: with ``promote.require_approval``, the ``approval_status`` tag is
  ``approved`` and the approval record (``gate/approval-v<N>.json``) says approved for this version.
- For the ``champion`` alias only (other aliases, e.g. ``challenger``, are never moved by promotion):
  ``champion_not_promoted``: the version carries ``champion_since`` (written by every pipeline move:
  promotion, approval, rollback), was not rolled back away from since, and no other version became
  champion later: an alias set by hand, or moved back to a superseded or rolled-back version, fails.
  ``champion_lineage_mismatch``: the champion it replaced (``previous_champion_version``) is the one
  its gate compared it with (``gate_champion``; both absent for a first champion), and that version
  exists, passed the gate and held ``champion`` itself. A version gated against v3 that replaced v4
  (an approval that came after another promotion) was never compared with what it replaced.
- ``alias_missing`` (no version holds the alias, or the registered model is gone) and
  ``registry_unreachable`` (the registry or an artifact cannot be read: nothing can be checked).

Not verifiable here: someone with write access who forges the *whole* record consistently (tags
and decision artifact and ``champion_since``) is indistinguishable from the pipeline; that needs
registry permissions (MLflow authentication) or signed records. Times are compared at the one-second
resolution they are recorded with: a version rolled back in the same second it became champion counts as
rolled back (fail closed); two versions made champion in the same second do not count as "later".
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import ServiceUnavailable
from pipeline.registry.contract import (
    APPROVAL,
    CHAMPION,
    GATE,
    VersionRecord,
    approval_artifact,
    champion_blocker,
    decision_artifact,
)
from pipeline.registry.read import get_alias
from pipeline.tracking import mlflow_client

logger = logging.getLogger(__name__)

# stable reason codes (``/readyz``, ``/v1/model``); the value is what it means
ALIAS_MISSING = "alias_missing"
REGISTRY_UNREACHABLE = "registry_unreachable"
NOT_GATED = "champion_not_gated"
NOT_APPROVED = "champion_not_approved"
NOT_PROMOTED = "champion_not_promoted"
LINEAGE_MISMATCH = "champion_lineage_mismatch"
LOAD_FAILED = "model_load_failed"

REASONS: dict[str, str] = {
    ALIAS_MISSING: "no version holds the served alias (deleted, or the registered model is gone)",
    REGISTRY_UNREACHABLE: "the model registry could not be read, so the alias could not be verified",
    NOT_GATED: "the version holding the alias has no passing gate decision on record",
    NOT_APPROVED: "promote.require_approval is set and no reviewer approved the version",
    NOT_PROMOTED: "the alias was not moved to the version by the promotion path (set by hand, or moved back "
                  "to a superseded or rolled-back version)",
    LINEAGE_MISMATCH: "the version replaced a champion other than the one its gate compared it with",
    LOAD_FAILED: "the verified version could not be loaded",
}

_FIX = ("promote a gated version (`xrayops promote`, `xrayops registry approve`) or move back with "
        "`xrayops registry rollback`; see `xrayops registry show`")


@dataclass(frozen=True)
class TrustVerdict:
    """The outcome of checking the served alias: ``reason`` None = the version may be served."""

    reason: str | None
    detail: str
    version: Any | None = None  # the MLflow ModelVersion holding the alias, when one was found

    @property
    def trusted(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class TrustEvidence:
    """What :func:`judge` decides on, read from the registry by :func:`check_alias`."""

    record: VersionRecord  # the version holding the alias
    decision: Mapping[str, Any] | None  # its gate decision artifact (None: absent)
    approval: Mapping[str, Any] | None  # its approval record artifact (None: absent or not read)
    replaced: VersionRecord | None  # the version its previous_champion_version names (None: absent or unknown)
    latest_other: tuple[str, datetime] | None  # another version that became champion latest, and when


def _as_version(value: Any) -> str | None:
    return None if value is None else str(value)


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def judge(ev: TrustEvidence, *, model: str, alias: str, require_approval: bool) -> tuple[str, str] | None:
    """The rule (pure): ``(reason, detail)`` when the version must not be served, else None."""
    r = ev.record
    what = f"{model} v{r.version} (alias '{alias}')"
    approval = ev.approval or {}
    # the registry's own rule (gate passed; approved when required), on the tags backed by their artifacts
    blocker = champion_blocker(
        gate_passed=r.gate is not None and r.gate.passed, require_approval=require_approval,
        approved=(r.approval is not None and r.approval.approved and approval.get("approved") is True
                  and str(approval.get("version")) == r.version))
    if blocker == GATE:
        verdict = "missing" if r.gate is None else f"{r.gate.verdict!r} (failed: {r.gate.failed_text})"
        return NOT_GATED, f"{what}: gate verdict {verdict}; only versions that passed the promotion gate are served"
    problem = _decision_problem(ev.decision, r, model)
    if problem:
        return NOT_GATED, (f"{what}: the gate tags say pass but the recorded decision "
                           f"{decision_artifact(r.version)} {problem}; the tags were not written by the gate")
    if blocker == APPROVAL:
        status = r.approval.status if r.approval else "missing"
        return NOT_APPROVED, (f"{what}: promote.require_approval is set and it has no approval on record "
                              f"(approval_status={status!r}, record {'found' if ev.approval else 'missing'})")
    if alias != CHAMPION:
        return None
    return _promotion_problem(ev, what)


def _decision_problem(decision: Mapping[str, Any] | None, r: VersionRecord, model: str) -> str | None:
    if decision is None:
        return "is missing"
    if decision.get("promote") is not True:
        return f"says not to promote ({decision.get('reason')!s:.120})"
    if str(decision.get("challenger_version")) != r.version or decision.get("model") != model:
        return (f"is about {decision.get('model')} v{decision.get('challenger_version')}, "
                f"not {model} v{r.version}")
    assert r.gate is not None
    if _as_version(decision.get("champion_version")) != r.gate.champion:
        return (f"compared it with champion {decision.get('champion_version')} but the gate_champion tag says "
                f"{r.gate.champion}")
    return None


def _promotion_problem(ev: TrustEvidence, what: str) -> tuple[str, str] | None:
    r = ev.record
    since = _time(r.champion.since)
    if since is None:
        return NOT_PROMOTED, (f"{what}: no valid champion_since tag, so the alias was not moved there by "
                              "promotion, approval or rollback (set by hand?)")
    rolled = _time(r.rollback.at) if r.rollback else None
    if rolled is not None and rolled >= since:  # a tie cannot be ordered: fail closed
        return NOT_PROMOTED, (f"{what}: rolled back at {r.rollback.at} (after it became champion at "  # type: ignore[union-attr]
                              f"{r.champion.since}) and not restored since")
    if ev.latest_other is not None and ev.latest_other[1] > since:
        other, at = ev.latest_other
        return NOT_PROMOTED, (f"{what}: v{other} became champion later ({at.isoformat()}) than this version "
                              f"({r.champion.since}); the alias was moved back outside `xrayops registry rollback`")
    replaced, compared = r.champion.previous_version, r.gate.champion if r.gate else None
    if replaced != compared:
        return LINEAGE_MISMATCH, (f"{what}: it replaced champion {_name(replaced)} but its gate compared it with "
                                  f"{_name(compared)}, so it was never shown to be at least as good as what it "
                                  "replaced; gate it again against the current champion")
    if replaced is not None:
        p = ev.replaced
        if p is None or p.gate is None or not p.gate.passed or _time(p.champion.since) is None:
            state = ("does not exist" if p is None else "never passed the gate" if p.gate is None or not p.gate.passed
                     else "never held champion")
            return LINEAGE_MISMATCH, f"{what}: it claims to have replaced champion v{replaced}, which {state}"
    return None


def _name(version: str | None) -> str:
    return "none" if version is None else f"v{version}"


# --------------------------------------------------------------------------- reading the evidence


def check_alias(settings: Settings, alias: str) -> TrustVerdict:
    """Find the version holding ``alias`` and decide whether it may be served (see the module docstring).

    The alias and its evidence are separate registry reads, and a promotion running at the
    same time writes several tags and aliases one after another (:func:`pipeline.registry.write.move_champion`).
    So the read is checked like an optimistic transaction: the alias is read again after its
    evidence and, when it moved meanwhile, everything is read afresh. A ``champion_not_promoted``
    verdict (the one a promotion in flight can show for a moment: the new champion's alias
    moved but its ``champion_since`` not yet written) is confirmed by one more read after
    :data:`SETTLE_S`; a verdict that persists stands. Every read that fails fails closed.
    """
    verdict = _check_once(settings, alias)
    if verdict.reason == NOT_PROMOTED:
        time.sleep(SETTLE_S)
        verdict = _check_once(settings, alias)
    return verdict


SETTLE_S = 0.5  # how long a promotion in flight may take between its alias move and its audit tag
_SNAPSHOT_TRIES = 3


def _check_once(settings: Settings, alias: str) -> TrustVerdict:
    model = settings.registered_model
    try:
        client = _client(settings)
        for _ in range(_SNAPSHOT_TRIES):
            mv = get_alias(settings, alias)  # only "not found" is None; other errors raise (fail closed)
            if mv is None:
                return TrustVerdict(ALIAS_MISSING, f"no version of {model} holds alias '{alias}' (it was deleted, "
                                    f"or the registered model does not exist); {_FIX}")
            ev = _evidence(settings, client, mv, alias)
            again = get_alias(settings, alias)
            if again is not None and str(again.version) == str(mv.version):
                break  # the alias did not move while its evidence was read
    except ServiceUnavailable as exc:
        logger.warning("registry read for alias %s failed: %s", alias, str(exc)[:300])
        return TrustVerdict(REGISTRY_UNREACHABLE, f"the model registry ({_where(settings)}) could not be read, so "
                            f"alias '{alias}' could not be verified; check that it is reachable (see the server log "
                            "for the error)")
    found = judge(ev, model=model, alias=alias, require_approval=settings.promote.require_approval)
    if found is None:
        return TrustVerdict(None, f"{model} v{mv.version} holds alias '{alias}' and is verified", mv)
    return TrustVerdict(found[0], f"{found[1]}; {_FIX}", mv)


def _where(settings: Settings) -> str:
    from pipeline.connections import mask_uri

    return mask_uri(settings.registry_uri)


def _client(settings: Settings) -> Any:
    try:
        return mlflow_client(settings)
    except Exception as exc:  # TrackingUnavailable or a broken URI: nothing can be checked
        raise ServiceUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _evidence(settings: Settings, client: Any, mv: Any, alias: str) -> TrustEvidence:
    try:
        record = VersionRecord.from_version(mv)
        decision = approval = None
        if record.gate is not None and record.gate.passed and mv.run_id:
            decision = _run_json(client, mv.run_id, decision_artifact(mv.version))
            if settings.promote.require_approval:
                approval = _run_json(client, mv.run_id, approval_artifact(mv.version))
        replaced, latest = None, None
        if alias == CHAMPION:
            replaced = _record(client, settings.registered_model, record.champion.previous_version)
            latest = _latest_champion(client, settings.registered_model, exclude=record.version)
        return TrustEvidence(record, decision, approval, replaced, latest)
    except ServiceUnavailable:
        raise
    except Exception as exc:  # any read failure: the alias cannot be verified, fail closed
        logger.warning("reading the record of %s v%s failed: %s: %s", settings.registered_model, mv.version,
                       type(exc).__name__, str(exc)[:300])
        raise ServiceUnavailable from exc


def _run_json(client: Any, run_id: str, artifact: str) -> dict[str, Any] | None:
    """A JSON artifact of a run, or None when the run has no such file."""
    parent = artifact.rpartition("/")[0] or None
    if not any(a.path == artifact for a in client.list_artifacts(run_id, parent)):
        return None
    with tempfile.TemporaryDirectory(prefix="xrayops-trust-") as tmp:
        path = client.download_artifacts(run_id, artifact, tmp)
        data = json.loads(Path(path).read_text())
    return data if isinstance(data, dict) else None


def _record(client: Any, model: str, version: str | None) -> VersionRecord | None:
    from mlflow.exceptions import MlflowException

    if version is None:
        return None
    try:
        return VersionRecord.from_version(client.get_model_version(model, version))
    except MlflowException as exc:
        if str(exc.error_code) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _latest_champion(client: Any, model: str, *, exclude: str) -> tuple[str, datetime] | None:
    """The other version with the latest ``champion_since`` (unparseable times are ignored)."""
    latest: tuple[str, datetime] | None = None
    for mv in client.search_model_versions(f"name='{model}'"):
        if str(mv.version) == exclude:
            continue
        since = _time(VersionRecord.from_version(mv).champion.since)
        if since is not None and (latest is None or since > latest[1]):
            latest = (str(mv.version), since)
    return latest
