"""The registry contract: alias names, version tag keys and run artifact paths, as typed objects.

Everything the pipeline writes onto a registry version (tags) or next to it (artifacts of its
training run) is named here and nowhere else; readers and writers go through these objects.

Tags are strings. ``to_tags()`` never writes a placeholder for a missing value (no ``"None"``):
a missing value is an absent tag, except the data version, which lineage always states:
``dvc_md5`` / ``dvc_rev`` = :data:`UNVERSIONED` when the data was not versioned with DVC.
``from_tags()`` reads absent tags (and :data:`UNVERSIONED`) as None and, for versions
registered before that rule, also reads the literal ``"None"`` as None.

Groups of tags, each written by one step:

- :class:`VersionTags`: lineage and headline metrics, at registration;
- :class:`ExportTags`: SavedModel / ONNX export and parity, at registration;
- :class:`GateTags`: the promotion gate's verdict;
- :class:`ApprovalTags`: a reviewer's decision (or the timeout);
- :class:`ChampionTags`: alias moves (champion since / why / previous champion / restored by);
- :class:`RollbackTags`: a rollback away from the version;
- :class:`EvidenceTags`: where the version's evidence pack was published.

:class:`VersionRecord` reads them all from a ``ModelVersion`` and holds the rule of which
version may hold ``champion`` (:func:`champion_blocker`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import RegistryError

if TYPE_CHECKING:
    from pipeline.config import Settings

# --------------------------------------------------------------------------- aliases

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"

# --------------------------------------------------------------------------- run artifacts

EVALUATION_DIR = "evaluation"
EVALUATION_ARTIFACT = f"{EVALUATION_DIR}/metrics.json"
OPERATING_POINT_ARTIFACT = f"{EVALUATION_DIR}/operating_point.json"
SUBGROUPS_ARTIFACT = f"{EVALUATION_DIR}/subgroups.json"
DECISION_CURVE_ARTIFACT = f"{EVALUATION_DIR}/decision_curve.json"
FAILURE_ANALYSIS_ARTIFACT = f"{EVALUATION_DIR}/failure_analysis.json"
PLOTS_DIR = "plots"
REFERENCE_ARTIFACT = "reference/profile.parquet"
PCA_ARTIFACT = "reference/embedding_pca.npz"
SAVED_MODEL_ARTIFACT = "export/saved_model"
ONNX_ARTIFACT = "export/model.onnx"
GATE_DIR = "gate"
ROLLBACK_DIR = "registry"
MODEL_CARD_DIR = "model_card"
CARD_DIR = "model_cards"  # under <reports_dir>
EXPLAIN_ARTIFACT = f"{EVALUATION_DIR}/explain.json"
SLICES_ARTIFACT = f"{EVALUATION_DIR}/slices.json"
ARCHITECTURE_DIR = "architecture"
ARCHITECTURE_REPORT_ARTIFACT = f"{ARCHITECTURE_DIR}/report.json"
ARCHITECTURE_TEXT_ARTIFACT = f"{ARCHITECTURE_DIR}/report.txt"
FILTERS_ARTIFACT = f"{ARCHITECTURE_DIR}/first_layer_filters.png"
FEATURE_MAPS_ARTIFACT = f"{ARCHITECTURE_DIR}/feature_maps.png"
EVIDENCE_DIR = "evidence"  # under <reports_dir>, and in the training run


def plot_artifact(name: str) -> str:
    """``plots/<name>.png`` of a training run (evaluation figures, Grad-CAM grid)."""
    return f"{PLOTS_DIR}/{name}.png"


GRADCAM_ARTIFACT = plot_artifact("gradcam_grid")
TRAINING_CURVES_ARTIFACT = plot_artifact("training_curves")
RELIABILITY_ARTIFACT = plot_artifact("reliability")


def decision_artifact(version: Any) -> str:
    """The gate decision JSON of ``version`` (in the run that was gated)."""
    return f"{GATE_DIR}/decision-v{version}.json"


def approval_artifact(version: Any) -> str:
    """The approval record JSON of ``version`` (in its training run)."""
    return f"{GATE_DIR}/approval-v{version}.json"


def rollback_artifact(at: str) -> str:
    """The audit record of a rollback at ISO time ``at`` (colons dropped), in both versions' runs."""
    return f"{ROLLBACK_DIR}/rollback-{at.replace(':', '')}.json"


def model_card_artifact(version: Any) -> str:
    """The model card of ``version`` as a run artifact."""
    return f"{MODEL_CARD_DIR}/model_card-v{version}.md"


def card_path(settings: Settings, version: Any) -> Path:
    """The model card of ``version`` as a file: ``<reports_dir>/model_cards/<model>-v<N>.md``."""
    return settings.reports_dir / CARD_DIR / f"{settings.registered_model}-v{version}.md"


def evidence_artifact(version: Any, suffix: str) -> str:
    """The evidence pack of ``version`` as a run artifact: ``evidence/v<N>/evidence.<suffix>`` (json | html)."""
    return f"{EVIDENCE_DIR}/v{version}/evidence.{suffix}"


def evidence_path(settings: Settings, version: Any, suffix: str) -> Path:
    """The evidence pack of ``version`` as a file: ``<reports_dir>/evidence/<model>-v<N>/evidence.<suffix>``."""
    return settings.reports_dir / EVIDENCE_DIR / f"{settings.registered_model}-v{version}" / f"evidence.{suffix}"


def model_uri(name: str, version: Any) -> str:
    return f"models:/{name}/{version}"


def run_uri(run_id: str, artifact: str) -> str:
    return f"runs:/{run_id}/{artifact}"


# --------------------------------------------------------------------------- tag encoding

UNVERSIONED = "unversioned"  # dvc_md5 / dvc_rev of data that DVC did not version


def _missing(value: Any) -> bool:
    return value is None or value == "None"


def _text(tags: Mapping[str, str], key: str) -> str | None:
    value = tags.get(key)
    return None if _missing(value) else str(value)


def _versioned(tags: Mapping[str, str], key: str) -> str | None:
    value = _text(tags, key)
    return None if value == UNVERSIONED else value


def _int(tags: Mapping[str, str], key: str) -> int | None:
    value = _text(tags, key)
    return None if value is None else int(value)


def _float(tags: Mapping[str, str], key: str) -> float | None:
    value = _text(tags, key)
    return None if value in (None, "") else float(value)  # type: ignore[arg-type]


def _put(tags: dict[str, str], key: str, value: Any, limit: int | None = None) -> None:
    if value is None:
        return
    text = str(value)
    tags[key] = text[:limit] if limit else text


@dataclass(frozen=True)
class MetricTag:
    """A headline test metric with its interval: tag ``test_<metric>`` = ``"0.9312 [0.88, 0.97]"``."""

    value: float
    ci: tuple[float | None, float | None] | None = None

    PREFIX = "test_"

    def text(self) -> str:
        if self.ci is None or self.ci == (None, None):
            return f"{self.value:.4f}"
        lo, hi = ("null" if b is None else str(b) for b in self.ci)
        return f"{self.value:.4f} [{lo}, {hi}]"

    @classmethod
    def parse(cls, text: str) -> MetricTag | None:
        """The metric of a tag value, or None when it is not one (unparseable)."""
        value, _, ci = str(text).partition(" ")
        try:
            bounds = json.loads(ci.replace("None", "null").replace("nan", "NaN")) if ci else None
            return cls(float(value), tuple(bounds) if bounds is not None else None)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return None


# --------------------------------------------------------------------------- tag groups


@dataclass(frozen=True)
class VersionTags:
    """Lineage and headline tags of a registry version (no patient data), written at registration."""

    git_commit: str | None = None
    git_dirty: str | None = None
    lock_sha256: str | None = None
    seed: int | None = None
    dataset: str | None = None
    dvc_md5: str | None = None
    dvc_rev: str | None = None
    split_certificate: str | None = None
    model_arch: str | None = None
    input_size: int | None = None
    input_channels: int | None = None
    classes: list[str] | None = None
    positive_class: str | None = None
    task: str | None = None
    operating_threshold: float | None = None
    threshold_policy: str | None = None
    gradcam_sanity: str | None = None
    gradcam_sanity_rank_corr: float | None = None
    test_metrics: dict[str, MetricTag] = field(default_factory=dict)

    def to_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        for key in ("git_commit", "git_dirty", "lock_sha256", "seed", "dataset"):
            _put(tags, key, getattr(self, key))
        tags["dvc_md5"] = self.dvc_md5 or UNVERSIONED
        tags["dvc_rev"] = self.dvc_rev or UNVERSIONED
        for key in ("split_certificate", "model_arch", "input_size", "input_channels"):
            _put(tags, key, getattr(self, key))
        if self.classes is not None:
            tags["classes"] = json.dumps(self.classes)
        _put(tags, "positive_class", self.positive_class)
        _put(tags, "task", self.task)
        if self.operating_threshold is not None:
            tags["operating_threshold"] = f"{self.operating_threshold:.6f}"
        _put(tags, "threshold_policy", self.threshold_policy)
        _put(tags, "gradcam_sanity", self.gradcam_sanity)
        _put(tags, "gradcam_sanity_rank_corr", self.gradcam_sanity_rank_corr)
        for name, metric in self.test_metrics.items():
            tags[f"{MetricTag.PREFIX}{name}"] = metric.text()
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> VersionTags:
        classes = _text(tags, "classes")
        metrics = {}
        for key, text in tags.items():
            if key.startswith(MetricTag.PREFIX):
                metric = MetricTag.parse(text)
                if metric is not None:
                    metrics[key.removeprefix(MetricTag.PREFIX)] = metric
        return cls(git_commit=_text(tags, "git_commit"), git_dirty=_text(tags, "git_dirty"),
                   lock_sha256=_text(tags, "lock_sha256"), seed=_int(tags, "seed"), dataset=_text(tags, "dataset"),
                   dvc_md5=_versioned(tags, "dvc_md5"), dvc_rev=_versioned(tags, "dvc_rev"),
                   split_certificate=_text(tags, "split_certificate"), model_arch=_text(tags, "model_arch"),
                   input_size=_int(tags, "input_size"), input_channels=_int(tags, "input_channels"),
                   classes=json.loads(classes) if classes is not None else None,
                   positive_class=_text(tags, "positive_class"), task=_text(tags, "task"),
                   operating_threshold=_float(tags, "operating_threshold"),
                   threshold_policy=_text(tags, "threshold_policy"), gradcam_sanity=_text(tags, "gradcam_sanity"),
                   gradcam_sanity_rank_corr=_float(tags, "gradcam_sanity_rank_corr"), test_metrics=metrics)

    @classmethod
    def from_version(cls, mv: Any) -> VersionTags:
        return cls.from_tags(mv.tags)

    def input_shape(self, what: str = "this version") -> tuple[int, int, list[str]]:
        """``(image_size, channels, classes)``; RegistryError naming the tags that are missing."""
        missing = [k for k in ("input_size", "input_channels", "classes") if getattr(self, k) is None]
        if missing:
            raise RegistryError(f"{what} has no tag {', '.join(missing)}: it was not registered by xrayops "
                                "(register it with `xrayops promote`)")
        return self.input_size, self.input_channels, list(self.classes)  # type: ignore[arg-type, return-value]


@dataclass(frozen=True)
class ExportTags:
    """What :func:`pipeline.registry.export.log_exports` left in the run, and its ONNX parity."""

    saved_model: str | None = None  # the artifact path, or "skipped"
    onnx: str | None = None  # the artifact path, or disabled | failed | parity_failed
    onnx_error: str | None = None
    onnx_parity: str | None = None  # max |Δp| Keras vs ONNX Runtime, formatted
    onnx_opset: int | None = None

    PARITY_TAG = "onnx_parity_max_abs_diff"
    DISABLED, FAILED, PARITY_FAILED, SKIPPED = "disabled", "failed", "parity_failed", "skipped"

    def to_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        _put(tags, "export_saved_model", self.saved_model)
        _put(tags, "onnx_export", self.onnx)
        _put(tags, "onnx_export_error", self.onnx_error, 250)
        _put(tags, self.PARITY_TAG, self.onnx_parity)
        _put(tags, "onnx_opset", self.onnx_opset)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> ExportTags:
        return cls(_text(tags, "export_saved_model"), _text(tags, "onnx_export"), _text(tags, "onnx_export_error"),
                   _text(tags, cls.PARITY_TAG), _int(tags, "onnx_opset"))


PARITY_TAG = ExportTags.PARITY_TAG


@dataclass(frozen=True)
class GateTags:
    """The promotion gate's verdict on the version (the full decision is :func:`decision_artifact`)."""

    verdict: str  # pass | fail
    failed: tuple[str, ...] = ()
    decided_at: str | None = None
    champion: str | None = None  # the champion compared against; None = absolute floors only
    reason: str | None = None

    PASS, FAIL = "pass", "fail"

    @property
    def passed(self) -> bool:
        return self.verdict == self.PASS

    @property
    def failed_text(self) -> str:
        return ",".join(self.failed) or "none"

    @classmethod
    def of(cls, *, promote: bool, failed: list[str], decided_at: str, champion: str | None,
           reason: str) -> GateTags:
        return cls(cls.PASS if promote else cls.FAIL, tuple(failed), decided_at, champion, reason)

    def to_tags(self) -> dict[str, str]:
        tags = {"gate_verdict": self.verdict, "gate_failed": self.failed_text}
        _put(tags, "gate_decided_at", self.decided_at)
        _put(tags, "gate_champion", self.champion)
        _put(tags, "gate_reason", self.reason, 250)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> GateTags | None:
        """None when the version was never gated."""
        verdict = _text(tags, "gate_verdict")
        if verdict is None:
            return None
        failed = _text(tags, "gate_failed")
        return cls(verdict, tuple(failed.split(",")) if failed and failed != "none" else (),
                   _text(tags, "gate_decided_at"), _text(tags, "gate_champion"), _text(tags, "gate_reason"))


@dataclass(frozen=True)
class ApprovalRecord:
    """A reviewer's decision on a gate-passing version (the JSON artifact and, as tags, :class:`ApprovalTags`)."""

    approved: bool
    status: str  # approved | rejected | timeout
    reviewer: str | None
    comment: str | None
    decided_at: str
    version: str

    APPROVED, REJECTED, TIMEOUT = "approved", "rejected", "timeout"

    def to_dict(self) -> dict[str, Any]:
        return {"approved": self.approved, "status": self.status, "reviewer": self.reviewer,
                "comment": self.comment, "decided_at": self.decided_at, "version": self.version}


@dataclass(frozen=True)
class ApprovalTags:
    status: str
    reviewer: str = ""
    comment: str = ""
    decided_at: str | None = None

    @property
    def approved(self) -> bool:
        return self.status == ApprovalRecord.APPROVED

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> ApprovalTags:
        """From an approval record (``ApprovalRecord.to_dict()``)."""
        return cls(record["status"], record.get("reviewer") or "", record.get("comment") or "", record["decided_at"])

    def to_tags(self) -> dict[str, str]:
        tags = {"approval_status": self.status, "approval_reviewer": self.reviewer,
                "approval_comment": self.comment[:250]}
        _put(tags, "approval_decided_at", self.decided_at)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> ApprovalTags | None:
        """None when no reviewer decided on the version."""
        status = _text(tags, "approval_status")
        if not status:
            return None
        return cls(status, tags.get("approval_reviewer") or "", tags.get("approval_comment") or "",
                   _text(tags, "approval_decided_at"))


@dataclass(frozen=True)
class ChampionTags:
    """Written when ``champion`` moves to the version (promotion, approval or rollback)."""

    since: str | None = None
    reason: str | None = None
    previous_version: str | None = None  # the champion it replaced
    restored_by: str | None = None  # set by a rollback back to this version

    def to_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        _put(tags, "previous_champion_version", self.previous_version)
        _put(tags, "champion_since", self.since)
        _put(tags, "champion_reason", self.reason, 250)
        _put(tags, "restored_by", self.restored_by)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> ChampionTags:
        return cls(_text(tags, "champion_since"), _text(tags, "champion_reason"),
                   _text(tags, "previous_champion_version"), _text(tags, "restored_by"))


@dataclass(frozen=True)
class RollbackTags:
    """Written on the version ``champion`` was rolled back away from."""

    at: str
    reason: str = ""
    by: str | None = None

    def to_tags(self) -> dict[str, str]:
        tags = {"rolled_back_at": self.at, "rolled_back_reason": self.reason[:250]}
        _put(tags, "rolled_back_by", self.by)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> RollbackTags | None:
        at = _text(tags, "rolled_back_at")
        if not at:
            return None
        return cls(at, tags.get("rolled_back_reason") or "", _text(tags, "rolled_back_by"))


@dataclass(frozen=True)
class EvidenceTags:
    """Written when the version's evidence pack is (re)published: tag ``evidence_pack`` = the run URI of its HTML."""

    html_uri: str | None = None

    TAG = "evidence_pack"

    def to_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        _put(tags, self.TAG, self.html_uri)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> EvidenceTags | None:
        """None when no pack was published for the version."""
        uri = _text(tags, cls.TAG)
        return cls(uri) if uri else None


EVIDENCE_TAG = EvidenceTags.TAG


# --------------------------------------------------------------------------- the whole version

GATE, APPROVAL, ROLLED_BACK, NOT_READY = "gate", "approval", "rolled_back", "not_ready"
READY = "READY"  # MLflow's ModelVersion.status of a usable version (not PENDING/FAILED_REGISTRATION)


def champion_blocker(*, gate_passed: bool, approved: bool, require_approval: bool, rolled_back: bool = False,
                     ready: bool = True) -> str | None:
    """The registry's rule: ``champion`` only points at a version that is registered (status READY), was
    never rolled back, passed the gate and, when ``promote.require_approval``, that a reviewer approved.
    Returns what blocks it (:data:`NOT_READY`, :data:`ROLLED_BACK`, :data:`GATE` or :data:`APPROVAL`)
    or None when it may hold ``champion``. (Which champion the gate compared it with is checked when
    the alias moves: :func:`pipeline.registry.write.move_champion`.)"""
    if not ready:
        return NOT_READY
    if rolled_back:
        return ROLLED_BACK
    if not gate_passed:
        return GATE
    if require_approval and not approved:
        return APPROVAL
    return None


@dataclass(frozen=True)
class VersionRecord:
    """Everything the pipeline recorded on one registry version, typed."""

    model: str
    version: str
    run_id: str | None
    lineage: VersionTags
    export: ExportTags
    gate: GateTags | None
    approval: ApprovalTags | None
    champion: ChampionTags
    rollback: RollbackTags | None
    evidence: EvidenceTags | None = None
    description: str = ""
    created_ms: int | None = None
    status: str | None = None  # MLflow's registration status (READY, PENDING_REGISTRATION, FAILED_REGISTRATION)

    @classmethod
    def from_version(cls, mv: Any) -> VersionRecord:
        tags = dict(mv.tags or {})
        return cls(model=str(getattr(mv, "name", "")), version=str(mv.version), run_id=getattr(mv, "run_id", None),
                   lineage=VersionTags.from_tags(tags), export=ExportTags.from_tags(tags),
                   gate=GateTags.from_tags(tags), approval=ApprovalTags.from_tags(tags),
                   champion=ChampionTags.from_tags(tags), rollback=RollbackTags.from_tags(tags),
                   evidence=EvidenceTags.from_tags(tags),
                   description=getattr(mv, "description", None) or "",
                   created_ms=getattr(mv, "creation_timestamp", None), status=getattr(mv, "status", None))

    def champion_blocker(self, *, require_approval: bool) -> str | None:
        """See :func:`champion_blocker` (on what is recorded on this version)."""
        return champion_blocker(gate_passed=self.gate is not None and self.gate.passed,
                                approved=self.approval is not None and self.approval.approved,
                                require_approval=require_approval, rolled_back=self.rollback is not None,
                                ready=self.status == READY)
