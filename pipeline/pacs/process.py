"""One study from the PACS through the champion and back: select → score → SR (STOW-RS) → FHIR → logs.

:func:`process_study`:

1. checks the served model (the ``serve.model_alias`` version the API would serve, verified by
   :mod:`pipeline.serving.trust`); none → ``model_unavailable``;
2. skips a study that already holds this model version's report (``already_processed``): the SR's series UID is
   derived from the study and the model version's device UID (:func:`pipeline.pacs.sr.result_uids`), so one
   QIDO-RS series search answers it, and a report stored twice would be one instance anyway;
3. lists the study's instances (QIDO-RS) and picks the image to score with ``data.admission``
   (:class:`~pipeline.data.policy.AdmissionPolicy`: CR/DX, chest, PA/AP, one frame, grayscale …), PA before AP,
   then series/instance number; none → ``no_frontal_image`` (the rule each instance broke, counted);
4. retrieves it (WADO-RS) and scores it with :class:`~pipeline.serving.service.InferenceService`, the API's own
   gate → preprocess → engine → production-log path (``source=pacs``, plus ``study_ref``), so the probability is
   the API's for the same file; a gate refusal → ``gate_rejected`` (logged by the service, reason only);
5. stores the UNVERIFIED Comprehensive SR (and, with ``pacs.secondary_capture``, the explanation overlay as a
   Secondary Capture) in the same study (STOW-RS) → ``sr_stored``;
6. writes the FHIR bundle to the outbox and POSTs it when ``serve.fhir_url`` is set.

Every outcome is returned (never raised, except for a misconfiguration) and recorded de-identified
(:mod:`pipeline.pacs.records`): the study is named by its salted reference ``S…`` (:func:`study_ref`) in logs,
records and the production log; its UIDs go back to the PACS and into the link store only.

A study handed to a Prefect run (``pacs.dispatch: flow | deployment``) is handed over by reference:
:func:`hand_over` keeps its UID in the 0600 ``pending/`` store and returns the reference, the run gets only that
(Prefect stores run parameters in its database and shows them in its UI), and :func:`process_study_ref` reads the
UID back; no UID kept for the reference → ``study_unknown``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings
from pipeline.data.deid import load_salt, pseudonymise
from pipeline.data.policy import AdmissionPolicy, OutOfPolicy
from pipeline.errors import BadImage, ConfigError, NotReady, PacsError, PacsUnavailable, Rejected
from pipeline.pacs import fhir, records
from pipeline.pacs.dicomweb import PacsClient, json_value
from pipeline.pacs.sr import ModelResult, build_overlay_sc, build_result_sr, device_uid, result_uids
from pipeline.serving.model_store import ModelStore
from pipeline.serving.production_log import LogWriter
from pipeline.serving.service import InferenceService

logger = logging.getLogger(__name__)

SR_STORED = "sr_stored"
ALREADY_PROCESSED = "already_processed"
NO_FRONTAL_IMAGE = "no_frontal_image"
GATE_REJECTED = "gate_rejected"
MODEL_UNAVAILABLE = "model_unavailable"
PACS_ERROR = "pacs_error"
PACS_UNAVAILABLE = "pacs_unavailable"
UNEXPECTED = "error"
STUDY_UNKNOWN = "study_unknown"
OUTCOMES = {
    SR_STORED: "the result SR was stored in the study",
    ALREADY_PROCESSED: "the study already holds this model version's SR",
    NO_FRONTAL_IMAGE: "no instance of the study is a frontal chest radiograph admitted by data.admission",
    GATE_REJECTED: "the selected image failed the input gate (the API would refuse it too)",
    MODEL_UNAVAILABLE: "no verified champion is served (see `xrayops serve` /readyz reasons)",
    PACS_ERROR: "the PACS refused a request or answered something unreadable",
    PACS_UNAVAILABLE: "the PACS could not be reached or failed (temporary: retried by the listener)",
    UNEXPECTED: "an unexpected error (a defect: the log names its type)",
    STUDY_UNKNOWN: "no study UID is kept for this reference under <pacs.state_dir>/pending (the run must share "
                   "the listener's pacs.state_dir and XRAYOPS_PSEUDONYM_SALT; or the study was handled meanwhile)",
}
TRANSIENT = frozenset({MODEL_UNAVAILABLE, PACS_UNAVAILABLE})  # the listener retries these later

# QIDO-RS fields the admission policy reads (DICOM JSON tags)
_FIELDS = {"Modality": "00080060", "BodyPartExamined": "00180015", "ViewPosition": "00185101",
           "NumberOfFrames": "00280008", "PhotometricInterpretation": "00280004", "SamplesPerPixel": "00280002",
           "PresentationIntentType": "00080068", "BurnedInAnnotation": "00280301", "SeriesNumber": "00200011",
           "InstanceNumber": "00200013", "SOPClassUID": "00080016"}
_VIEW_ORDER = {"PA": 0, "AP": 1}


@dataclass(frozen=True)
class PacsOutcome:
    """What happened to one study; de-identified (safe to print and log)."""

    status: str
    study_ref: str
    reason: str = ""
    request_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    fhir_status: str | None = None
    seconds: float = 0.0
    processed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def ok(self) -> bool:
        """An SR of the served model is in the study (stored now or before)."""
        return self.status in (SR_STORED, ALREADY_PROCESSED)

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT

    def line(self) -> str:
        """One line for a console or log."""
        if self.status == SR_STORED:
            return (f"study {self.study_ref}: SR stored ({self.model_name} v{self.model_version}, "
                    f"p={self.probability:.3f}, {self.label}; FHIR {self.fhir_status}) in {self.seconds:.2f} s")
        return f"study {self.study_ref}: {self.status}: {self.reason or OUTCOMES[self.status]}"


class PacsContext:
    """What processing studies needs once per process: the PACS client, the served model, the production-log
    writer, the salt. Build it once (the model loads once) and pass it to :func:`process_study` per study."""

    def __init__(self, settings: Settings, client: PacsClient, *, store: ModelStore | None = None,
                 writer: LogWriter | None = None) -> None:
        self.settings = settings
        self.client = client
        self.store = store or ModelStore(settings)
        self.writer = writer or LogWriter(settings.production_log, flush_s=0)
        self.salt = load_salt(settings.data.ingest.salt_env, settings.home)
        self.policy = AdmissionPolicy.from_config(settings.data.admission)

    def refresh(self) -> None:
        """Verify the alias and load a moved version (best-effort: a failure leaves the reason on the store)."""
        self.store.refresh()


def pacs_url(settings: Settings, url: str | None = None) -> str:
    """``url`` or ``data.dicomweb.url``.

    Raises:
        ConfigError: neither is set.
    """
    target = url or settings.data.dicomweb.url
    if not target:
        raise ConfigError("no PACS URL: pass --url or set data.dicomweb.url (the DICOMweb root, e.g. "
                          "http://pacs.example.org:8042/dicom-web)")
    return target


def pacs_client(settings: Settings, url: str | None = None) -> PacsClient:
    """The DICOMweb client of ``data.dicomweb`` (timeouts, credentials from the environment), at ``url`` if given."""
    return PacsClient.from_config(settings.data.dicomweb, url=pacs_url(settings, url))


def study_ref(study_uid: str, salt: bytes) -> str:
    """The study's de-identified reference (``S`` + 16 hex digits, keyed hash): the only name logs use."""
    return pseudonymise(study_uid, salt, prefix="S")


def request_id_for(study_uid: str, sop_uid: str, model_name: str, version: str, salt: bytes) -> str:
    """32 hex digits, stable per study image and model version (a feedback record keys on it)."""
    text = "\n".join(("pacs", study_uid, sop_uid, model_name, str(version)))
    return hmac.new(salt, text.encode(), hashlib.sha256).hexdigest()[:32]


def has_result(client: PacsClient, study_uid: str, model_name: str, version: str) -> bool:
    """The study holds the SR series of this model version (one QIDO-RS series search)."""
    series_uid, _ = result_uids(study_uid, "", device_uid(model_name, version))
    found = client.search_series(study_uid, {"SeriesInstanceUID": series_uid}, fields=["SeriesInstanceUID"])
    return any(json_value(item, "0020000E") == series_uid for item in found)


def select_image(client: PacsClient, study_uid: str, policy: AdmissionPolicy) -> tuple[dict[str, str] | None,
                                                                                           Counter[str]]:
    """The study's best admitted instance (UIDs) and the count of policy reasons the others broke."""
    import pydicom

    items = client.search_instances(study_uid, fields=list(_FIELDS.values()))
    candidates, broken = [], Counter[str]()
    for item in items:
        header = pydicom.Dataset.from_json({k: v for k, v in item.items() if k in _FIELDS.values()})
        try:
            policy.check(header)
        except OutOfPolicy as exc:
            broken[exc.reason] += 1
            continue
        except BadImage:
            broken["corrupt"] += 1
            continue
        view = str(header.get("ViewPosition", "") or "").upper()
        key = (_VIEW_ORDER.get(view, 2), _number(header.get("SeriesNumber")), _number(header.get("InstanceNumber")),
               json_value(item, "00080018") or "")
        candidates.append((key, item))
    if not candidates:
        return None, broken
    item = min(candidates, key=lambda c: c[0])[1]
    uids = {"study": study_uid, "series": json_value(item, "0020000E") or "", "sop": json_value(item, "00080018") or ""}
    return uids, broken


def _number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1 << 30


def process_study(ctx: PacsContext, study_uid: str) -> PacsOutcome:
    """Process one study (see the module docstring); the outcome is recorded and logged, never raised."""
    started = time.perf_counter()
    ref = study_ref(study_uid, ctx.salt)
    try:
        outcome = _process(ctx, study_uid, ref, started)
    except PacsUnavailable as exc:
        outcome = PacsOutcome(PACS_UNAVAILABLE, ref, _first_line(exc))
    except PacsError as exc:
        outcome = PacsOutcome(PACS_ERROR, ref, _first_line(exc))
    except Exception as exc:  # noqa: BLE001 - one study must not stop the listener; the message may hold UIDs
        outcome = PacsOutcome(UNEXPECTED, ref, f"unexpected {type(exc).__name__} while processing the study "
                                               "(a defect: please report it)")
    outcome = _timed(outcome, started)
    _record(ctx, outcome)
    (logger.info if outcome.ok else logger.warning)("%s", outcome.line())
    return outcome


def hand_over(settings: Settings, study_uid: str) -> str:
    """Keep the study's UID in the pending store (0600) and return its reference, the only thing a run gets."""
    ref = study_ref(study_uid, load_salt(settings.data.ingest.salt_env, settings.home))
    records.save_pending(settings, ref, study_uid)
    return ref


def process_study_ref(ctx: PacsContext, ref: str) -> PacsOutcome:
    """:func:`process_study` for a study handed over by reference (:func:`hand_over`); the UID kept for it is
    deleted once the outcome is final (a transient one keeps it for the retry). Nothing kept, or a UID whose
    reference under this salt is another one → ``study_unknown`` (recorded and logged like any outcome)."""
    try:
        uid = records.load_pending(ctx.settings, ref)
    except ValueError:
        uid, ref = None, "S?"  # not a reference at all: never echo what was passed (it may be a UID)
    if uid is None or study_ref(uid, ctx.salt) != ref:
        outcome = PacsOutcome(STUDY_UNKNOWN, ref, OUTCOMES[STUDY_UNKNOWN] if uid is None else
                              "the study UID kept for this reference has another reference under this process's "
                              "XRAYOPS_PSEUDONYM_SALT: the listener and the run must share the salt")
        _record(ctx, outcome)
        logger.warning("%s", outcome.line())
        return outcome
    outcome = process_study(ctx, uid)
    if not outcome.transient:
        records.drop_pending(ctx.settings, ref)
    return outcome


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _timed(outcome: PacsOutcome, started: float) -> PacsOutcome:
    return PacsOutcome(**{**asdict(outcome), "seconds": round(time.perf_counter() - started, 3)})


def _process(ctx: PacsContext, study_uid: str, ref: str, started: float) -> PacsOutcome:
    try:
        predictor = ctx.store.require()
    except NotReady as exc:
        return PacsOutcome(MODEL_UNAVAILABLE, ref, f"{exc.reason}: {exc}")
    name, version = predictor.model_name, predictor.version
    if has_result(ctx.client, study_uid, name, version):
        return PacsOutcome(ALREADY_PROCESSED, ref, f"the study already holds the SR of {name} v{version}",
                           model_name=name, model_version=version)
    chosen, broken = select_image(ctx.client, study_uid, ctx.policy)
    if chosen is None:
        counts = ", ".join(f"{reason} x{n}" for reason, n in sorted(broken.items())) or "no instances"
        ctx.writer.add_rejection({"request_id": None, "request_time": datetime.now(UTC), "source": "pacs",
                                  "model_name": name, "model_version": version, "reason": "out_of_policy",
                                  "status": 422, "study_ref": ref})
        return PacsOutcome(NO_FRONTAL_IMAGE, ref, f"no admitted frontal chest image ({counts})",
                           model_name=name, model_version=version)
    rid = request_id_for(study_uid, chosen["sop"], name, version, ctx.salt)
    data = ctx.client.retrieve_instance_bytes(chosen["study"], chosen["series"], chosen["sop"])
    service = InferenceService(ctx.settings, ctx.store, _Tagged(ctx.writer, {"study_ref": ref}))
    try:
        result = service.predict(data, request_id=rid, source="pacs",
                                 explain="gradcam" if ctx.settings.pacs.secondary_capture else False)
    except Rejected as exc:
        return PacsOutcome(GATE_REJECTED, ref, str(exc)[:300], request_id=rid, model_name=name,
                           model_version=version)
    except NotReady as exc:
        return PacsOutcome(MODEL_UNAVAILABLE, ref, f"{exc.reason}: {exc}")
    return _report(ctx, result, data, chosen, ref, rid)


def _report(ctx: PacsContext, result: Any, data: bytes, chosen: dict[str, str], ref: str, rid: str) -> PacsOutcome:
    """Store the SR (+ overlay), write FHIR, keep the link; the outcome of a scored study."""
    import pydicom

    from pipeline.data.dicom import quiet_pydicom

    positive = result.positive_class or result.classes[-1]
    model = ModelResult(result.model_name, str(result.model_version), positive, float(result.probability),
                        float(result.threshold if result.threshold is not None else 0.5), result.label == positive)
    with quiet_pydicom():  # pydicom logs and warns malformed values verbatim (a birth date, a name): PHI
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        report = build_result_sr(source, model, institution=ctx.settings.pacs.institution_name)
        outgoing = [report]
        if result.explanation is not None:
            outgoing.append(build_overlay_sc(source, result.explanation.overlay_png, model))
    stored = ctx.client.store_instances(outgoing, study_uid=chosen["study"])
    if str(report.SOPInstanceUID) not in stored.stored:
        raise PacsError("the PACS did not store the result SR (STOW-RS listed it as failed)")
    records.save_link(ctx.settings, rid, records.Link(chosen["study"], chosen["series"], chosen["sop"],
                                                      str(report.SeriesInstanceUID), str(report.SOPInstanceUID)))
    bundle = fhir.build_bundle(model, request_id=rid, study_uid=chosen["study"], sr_uid=str(report.SOPInstanceUID),
                               issued=datetime.now(UTC))
    delivery = fhir.deliver(bundle, folder=records.fhir_dir(ctx.settings), request_id=rid,
                            url=ctx.settings.serve.fhir_url, timeout_s=ctx.settings.pacs.fhir_timeout_s)
    return PacsOutcome(SR_STORED, ref, request_id=rid, model_name=model.model_name, model_version=model.model_version,
                       probability=model.probability, label=result.label, threshold=model.threshold,
                       fhir_status=delivery.status if delivery.status != "failed" else f"failed ({delivery.detail})")


def _record(ctx: PacsContext, outcome: PacsOutcome) -> None:
    """The de-identified record of an outcome (a failure to write it is logged, never raised)."""
    row = {**asdict(outcome), "event": "processed"}
    try:
        records.append_record(ctx.settings, row)
    except OSError:
        logger.exception("cannot record the outcome of study %s under %s", outcome.study_ref,
                         records.state_dir(ctx.settings))


class _Tagged:
    """A production-log writer that adds the study reference to every row (and rejection) it passes on."""

    def __init__(self, writer: LogWriter, extra: dict[str, Any]) -> None:
        self.writer, self.extra = writer, extra

    def add(self, row: dict[str, Any]) -> None:
        self.writer.add({**row, **self.extra})

    def add_rejection(self, row: dict[str, Any]) -> None:
        self.writer.add_rejection({**row, **self.extra})
