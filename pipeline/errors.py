"""Every error xrayops raises on purpose, in one place (one base, one tree).

Each class says what went wrong in words for the person who has to fix it; the CLI catches
:class:`XrayopsError`, prints the message on one line with its hint and exits 2 (1 for a failed
data validation). Errors of other libraries that mean "a service is not there" (MLflow, Prefect,
DVC) are wrapped at the edge into :class:`ServiceUnavailable` with the fix named.

Where an error also belongs to a builtin family (a missing file, a bad value) it keeps that
builtin as a second base, so ``except FileNotFoundError`` around it keeps working::

    XrayopsError
    ├── ConfigError (ValueError)             params.yaml / --set / environment
    ├── ServiceUnavailable                   MLflow, Prefect or DVC cannot be reached or answered with an error
    │   ├── TrackingUnavailable              the MLflow tracking/registry server does not answer
    │   └── OrchestratorUnavailable          the Prefect server (PREFECT_API_URL) does not answer
    ├── DataError                            the data → split path
    │   ├── SourceError (ValueError)         raw dataset not where or how the source expects it
    │   │   └── LabelMismatch                the labels CSV and the files do not match (counts, no names)
    │   ├── VersioningError                  DVC could not version or fetch a dataset
    │   ├── DatasetBusy (TimeoutError)       another run holds the dataset's lock (ingest) too long
    │   ├── SaltError (ValueError)           pseudonymisation salt missing, empty or shorter than 32 bytes
    │   ├── BadImage                         one unusable image (a quarantine reason; caught per file)
    │   ├── ValidationFailed                 a critical Great Expectations check failed (CLI exit 1)
    │   ├── LeakageError                     the split certificate does not hold
    │   │   └── SplitError                   the manifest cannot be split by patient as configured
    │   ├── InputError (FileNotFoundError)   image files the model needs are missing
    │   └── FeedbackError (ValueError)       feedback that cannot be stored or used
    ├── ModelError                           building, explaining or exporting a model
    │   ├── UnknownModel (KeyError)          a name that is not in the model zoo
    │   ├── WeightsUnavailable (FileNotFoundError)  pretrained weights not on disk (offline)
    │   ├── GradCamError (ValueError)        no convolutional feature map for Grad-CAM
    │   ├── ExportError                      SavedModel / ONNX export failed or lost parity
    │   └── CheckpointError                  no checkpoint folder for a training run (all held by live runs)
    ├── RegistryError                        the model registry
    │   ├── RegistryUnavailable (+ServiceUnavailable)  the registry answered with an error, not "not found"
    │   ├── RegistryBusy (TimeoutError)      another writer held the registry's alias lock too long
    │   ├── AuditError                       the audit log cannot be appended to (or its lock is held too long)
    │   └── PromotionError                   an alias move that would break the registry's rules
    │       └── StaleGateDecision            the champion changed since the version was gated
    ├── DeployError                          Prefect deployments could not be applied
    ├── PacsError                            a PACS (DICOMweb) refused or failed a request (URL masked)
    │   └── PacsUnavailable (+ServiceUnavailable)  the PACS cannot be reached, timed out or answered 5xx
    ├── PortInUse (OSError)                  a local service cannot bind its port: something listens there
    └── ServingError                         the API and the clinician UI
        ├── NotReady                         no model loaded (yet)
        ├── ExplainUnavailable               Grad-CAM not available for this model/deployment
        ├── Rejected                         an upload the input gate refused (stable reason code)
        ├── UiAuthError                      clinician-app sign-in not configured, unsafe, or its user file unusable
        └── ApiError                         an HTTP error response with a stable reason
"""

from __future__ import annotations


class XrayopsError(Exception):
    """Base of every error xrayops raises on purpose. ``hint`` is the fix, when one is known.

    A subclass may set ``hint`` on the class (a standard fix) or pass ``hint=`` per error.
    """

    hint: str | None = None

    def __init__(self, *args: object, hint: str | None = None) -> None:
        super().__init__(*args)
        if hint is not None:
            self.hint = hint


class ConfigError(XrayopsError, ValueError):
    """A configuration problem, worded for the person who has to fix it."""


class ServiceUnavailable(XrayopsError):
    """MLflow, Prefect or DVC could not be reached (or failed); the message names the service and the fix."""


class TrackingUnavailable(ServiceUnavailable):
    """The MLflow tracking/registry server does not answer (a password in its URI is masked)."""


class OrchestratorUnavailable(ServiceUnavailable):
    """The Prefect server named by ``PREFECT_API_URL`` does not answer."""


# --------------------------------------------------------------------------- data


class DataError(XrayopsError):
    """A problem with a dataset on the data → split path."""


class SourceError(DataError, ValueError):
    """The raw dataset is not where or how the source expects it."""


class LabelMismatch(SourceError):
    """The labels CSV and the files under the input folder do not match (more files without a row than
    ``data.ingest.max_label_mismatches``). The message gives counts, CSV line numbers, file ordinals and a
    diagnosis of the mismatch (absolute paths, another extension, letter case) — never a file name or a
    patient id, which can carry PHI."""

    hint = ("make each row of the labels CSV name its file as the source expects, or raise "
            "data.ingest.max_label_mismatches to accept files without a row")


class VersioningError(DataError, RuntimeError):
    """DVC could not version or fetch a dataset; the message says how to fix it."""


class DatasetBusy(DataError, TimeoutError):
    """Another run holds a dataset's lock (ingesting it) longer than ``data.ingest.lock_timeout_s``."""


class SaltError(DataError, ValueError):
    """The pseudonymisation salt is missing, empty or too short to keep pseudonyms from being reversed."""


class BadImage(DataError):
    """An input that cannot be used; ``reason`` is a stable code for quarantine and API errors."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ValidationFailed(DataError, RuntimeError):
    """A critical expectation failed; the message lists each failure."""


class LeakageError(DataError, RuntimeError):
    """The split certificate does not hold (patient overlap, tampering, stale split)."""


class SplitError(LeakageError):
    """The manifest cannot be split by patient as configured (e.g. too few patients)."""


class InputError(DataError, FileNotFoundError):
    """Image files are missing; the message names the path and the expected layout."""


class FeedbackError(DataError, ValueError):
    """Feedback that cannot be stored or used; the message says what to fix."""


# --------------------------------------------------------------------------- models


class ModelError(XrayopsError):
    """A model cannot be built, explained or exported."""


class UnknownModel(ModelError, KeyError):
    """A model name that is not in the zoo; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


class WeightsUnavailable(ModelError, FileNotFoundError):
    """Pretrained backbone weights cannot be found or downloaded; the message says where to put them."""


class GradCamError(ModelError, ValueError):
    """The model has no convolutional feature map Grad-CAM can use."""


class ExportError(ModelError, RuntimeError):
    """An export that could not be produced or does not match the Keras model."""


class CheckpointError(ModelError, RuntimeError):
    """A training run cannot hold a checkpoint folder: every one of its name is held by a live run, or the
    file system cannot lock folders."""


# --------------------------------------------------------------------------- registry, orchestration


class RegistryError(XrayopsError):
    """The model registry cannot do what was asked."""


class PromotionError(RegistryError, RuntimeError):
    """An alias move that would break the registry's rules (the message says which)."""


class RegistryUnavailable(RegistryError, ServiceUnavailable):
    """The registry answered a read or write with an error other than "not found" (a 5xx, a timeout, a
    locked database): nothing can be concluded from it, so nothing was decided or moved."""


class RegistryBusy(RegistryError, TimeoutError):
    """Another writer held the registry's alias lock longer than ``promote.registry_lock_timeout_s``."""


class StaleGateDecision(PromotionError):
    """The champion changed after the version was gated: its decision compared it with another model."""


class AuditError(RegistryError):
    """The audit log could not be appended to (unwritable, its lock held too long, or its end is not intact):
    registry moves stop rather than go unrecorded (see :mod:`pipeline.audit`)."""


class DeployError(XrayopsError, RuntimeError):
    """The deployments could not be applied; the message says what to do."""


# --------------------------------------------------------------------------- PACS (hospital integration)


class PacsError(XrayopsError):
    """A PACS request over DICOMweb failed: a refusal (401/403), a missing object (404), a malformed URL
    or answer. The message names the PACS by its masked URL, never a credential; ``status`` is the HTTP
    status when there was one."""

    def __init__(self, *args: object, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(*args, hint=hint)
        self.status = status


class PacsUnavailable(PacsError, ServiceUnavailable):
    """The PACS cannot be reached (refused, unresolvable), did not answer in time, or answered with a
    server error (5xx): nothing was fetched or stored by that request."""


# --------------------------------------------------------------------------- serving


class PortInUse(XrayopsError, OSError):
    """A service (e.g. the Evidently UI of `xrayops monitor ui`) cannot bind its port: something listens there."""


class ServingError(XrayopsError):
    """The API or the clinician UI cannot answer a request."""


class NotReady(ServingError, RuntimeError):
    """No model is served (not loaded yet, or withheld); the message says why, ``reason`` is a stable code."""

    reason = "model_not_ready"

    def __init__(self, *args: object, reason: str | None = None, hint: str | None = None) -> None:
        super().__init__(*args, hint=hint)
        if reason is not None:
            self.reason = reason


class ExplainUnavailable(ServingError, RuntimeError):
    """Grad-CAM cannot be computed for this model or deployment."""


class UiAuthError(ServingError, ValueError):
    """The clinician app's sign-in is not configured (no users, incomplete OIDC block), would be unsafe (no sign-in
    on a non-loopback address), or its user file cannot be used."""


# reason code → (HTTP status, what it means); the API documents this table.
REJECTION_REASONS: dict[str, tuple[int, str]] = {
    "empty": (400, "the upload has 0 bytes"),
    "too_large": (413, "the upload exceeds serve.max_upload_bytes"),
    "too_many_pixels": (413, "width × height exceeds serve.max_pixels (decompression-bomb guard)"),
    "not_an_image": (415, "the content is not PNG, JPEG or DICOM (checked by content, not file name)"),
    "unsupported_image": (415, "an image mode or DICOM encoding the service cannot read"),
    "corrupt": (422, "truncated or unreadable image data"),
    "out_of_policy": (422, "a DICOM file that data.admission does not admit (modality, body part, view, frames, "
                           "colour, presentation intent, burned-in annotation)"),
    "colour_photograph": (422, "colour pixels where a grayscale radiograph is expected"),
    "too_small": (422, "the shorter side is below serve.min_side"),
    "implausible_geometry": (422, "the aspect ratio exceeds serve.max_aspect"),
}


class Rejected(ServingError):
    """An upload the input gate refused: a stable ``reason`` code (:data:`REJECTION_REASONS`) and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    @property
    def status(self) -> int:
        return REJECTION_REASONS[self.reason][0]

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejected) and (self.reason, self.detail) == (other.reason, other.detail)

    __hash__ = Exception.__hash__


class ApiError(ServingError):
    """An HTTP error response: status, stable reason code, detail (never internal exception text)."""

    def __init__(self, status: int, reason: str, detail: str, request_id: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
        self.request_id, self.headers = request_id, headers
