"""The promotion decision as a pure function of the evidence: no registry, no model, no files.

:func:`decide` turns :class:`Evidence` (the challenger's test metrics and intervals, the paired
difference to the champion or None, the data checks) and the ``promote`` settings into a
:class:`GateDecision`. Gathering that evidence is :func:`pipeline.registry.gate.gather_evidence`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.config import PromoteSection


@dataclass
class Criterion:
    name: str
    value: float | int | bool | None
    threshold: str
    passed: bool


@dataclass
class GateDecision:
    """The promotion decision, as stored on the version and logged as JSON."""

    model: str
    challenger_version: str
    champion_version: str | None
    criteria: list[Criterion]
    promote: bool
    reason: str
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.criteria if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        rows = "\n".join(f"| {c.name} | {c.value} | {c.threshold} | {'✅' if c.passed else '❌'} |"
                         for c in self.criteria)
        verdict = "**PROMOTE**" if self.promote else "**KEEP CHAMPION**"
        return (f"### Promotion gate: {self.model} v{self.challenger_version} → {verdict}\n\n"
                f"Champion compared: {self.champion_version or 'none (absolute floors only)'}\n\n"
                f"| criterion | value | threshold | pass |\n|---|---|---|---|\n{rows}\n\n{self.reason}\n")



# --------------------------------------------------------------------------- evidence (what the gate decides on)


@dataclass(frozen=True)
class DataChecks:
    """(d) + (e): the split certificate and data validation of the evaluated dataset."""

    certificate_ok: bool  # the certificate file verifies
    patient_overlap: int | None  # patients shared between splits (None: no valid certificate)
    split_matches: bool  # the split the challenger was trained on is the evaluated one (False when unknown)
    validation_ok: bool  # data validation ran and had no critical failure
    split_manifest_ok: bool  # the certificate was written for the current manifest.parquet (sha256)
    validation_manifest_ok: bool  # the validation result was produced for the current manifest.parquet
    problems: tuple[str, ...] = ()  # why a data check failed, in words (recorded with the decision)


@dataclass
class Evidence:
    """Everything :func:`decide` needs; gathered by :func:`gather_evidence`."""

    task: str  # binary | multiclass
    metrics: Mapping[str, Any]  # the challenger's test metrics
    ci: Mapping[str, Any]  # their intervals, metric → [lo, hi]
    data: DataChecks
    champion_version: str | None = None  # None: no champion to compare with
    delta: Mapping[str, Any] | None = None  # paired bootstrap vs the champion: {"delta_<metric>", "ci", "resamples"}
    inputs: dict[str, Any] = field(default_factory=dict)  # recorded with the decision
    # binary: the challenger's subgroup rows of promote.subgroup_by ({"group", "patients", "metrics", "ci"}, see
    # pipeline.evaluation.subgroups) and the re-scored champion's AUC per group on the same images
    subgroups: Sequence[Mapping[str, Any]] | None = None
    champion_subgroup_auc: Mapping[str, Any] | None = None


# --------------------------------------------------------------------------- the decision (pure)


def _finite(value: Any) -> bool:
    return value is not None and value == value


def _ge(value: Any, floor: float) -> bool:
    return _finite(value) and value >= floor


def _le(value: Any, ceiling: float) -> bool:
    return _finite(value) and value <= ceiling


def _gt(value: Any, bound: float) -> bool:
    return _finite(value) and value > bound


def _low(interval: Any) -> Any:
    """Lower bound of an interval; None when there is none."""
    return interval[0] if interval is not None and len(interval) > 0 else None


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def decide(evidence: Evidence, cfg: PromoteSection, *, model: str, challenger_version: str) -> GateDecision:
    """The promotion decision from the evidence alone (no I/O).

    Criteria: binary — ``auc_floor`` (AUC ≥ ``min_auc``), ``sensitivity_ci_low`` (sensitivity CI
    lower bound ≥ ``sensitivity_ci_floor``), ``ece`` (≤ ``max_ece``); multi-class — ``accuracy_floor``
    (≥ ``min_accuracy``). With a champion: the paired Δ (AUC, or accuracy for multi-class) lower
    bound > −``auc_margin`` (non-inferiority) and, with ``require_superiority``, > 0. Always: the
    data checks (``split_patient_overlap``, ``split_certificate_match``, ``split_manifest_match``,
    ``data_validation``, ``validation_manifest_match``). Optional binary subgroup criteria: see
    :func:`subgroup_criteria`. A missing, NaN or degenerate value fails its criterion.
    """
    m, ci = evidence.metrics, evidence.ci
    criteria: list[Criterion] = []
    if evidence.task == "binary":
        criteria.append(Criterion("auc_floor", m.get("auc"), f">= {cfg.min_auc}", _ge(m.get("auc"), cfg.min_auc)))
        sens_lo = _low(ci.get("sensitivity"))
        criteria.append(Criterion("sensitivity_ci_low", sens_lo, f">= {cfg.sensitivity_ci_floor}",
                                  _ge(sens_lo, cfg.sensitivity_ci_floor)))
        criteria.append(Criterion("ece", m.get("ece"), f"<= {cfg.max_ece}", _le(m.get("ece"), cfg.max_ece)))
    else:
        criteria.append(Criterion("accuracy_floor", m.get("accuracy"), f">= {cfg.min_accuracy}",
                                  _ge(m.get("accuracy"), cfg.min_accuracy)))
    has_champion = evidence.champion_version is not None
    if has_champion:
        name = "delta_auc_ci_low" if evidence.task == "binary" else "delta_accuracy_ci_low"
        low = _low((evidence.delta or {}).get("ci"))
        criteria.append(Criterion(f"{name} (non-inferiority)", _rounded(low), f"> -{cfg.auc_margin}",
                                  _gt(low, -cfg.auc_margin)))
        if cfg.require_superiority:
            criteria.append(Criterion(f"{name} (superiority)", _rounded(low), "> 0", _gt(low, 0)))
    if evidence.task == "binary":
        criteria += subgroup_criteria(evidence, cfg)
    d = evidence.data
    criteria += [
        Criterion("split_patient_overlap", d.patient_overlap, "== 0 (certificate verified)",
                  d.certificate_ok and d.patient_overlap == 0),
        Criterion("split_certificate_match", d.split_matches, "training split == evaluated split",
                  d.certificate_ok and d.split_matches),
        Criterion("split_manifest_match", d.split_manifest_ok, "certificate manifest_sha256 == current manifest",
                  d.split_manifest_ok),
        Criterion("data_validation", d.validation_ok, "passed", d.validation_ok),
        Criterion("validation_manifest_match", d.validation_manifest_ok,
                  "validation manifest_sha256 == current manifest", d.validation_manifest_ok),
    ]
    promote = all(c.passed for c in criteria)
    failed = [c.name for c in criteria if not c.passed]
    reason = ("all criteria passed" if promote else f"failed: {', '.join(failed)}") + (
        "" if has_champion else " (no champion: absolute floors only)")
    return GateDecision(model, str(challenger_version), evidence.champion_version, criteria, promote, reason,
                        inputs=evidence.inputs)


# --------------------------------------------------------------------------- subgroup criteria (optional, binary)


def subgroup_criteria(evidence: Evidence, cfg: PromoteSection) -> list[Criterion]:
    """The subgroup criteria that ``cfg`` turns on (none by default).

    Checked groups: those of ``cfg.subgroup_by`` with ≥ ``cfg.subgroup_min_patients`` test patients.
    ``subgroup_sensitivity_ci_low[<attr>=<group>]``: each checked group's sensitivity CI lower bound ≥
    ``subgroup_sensitivity_ci_floor``. ``worst_subgroup_auc (non-inferiority)``, with a champion: the
    challenger's lowest group AUC ≥ the re-scored champion's lowest AUC over the same groups −
    ``subgroup_auc_margin`` (groups with one class, whose AUC is undefined, are left out of both). No
    checkable group fails the criterion (fail closed).
    """
    attr, n = cfg.subgroup_by, cfg.subgroup_min_patients
    checked = [r for r in evidence.subgroups or [] if (r.get("patients") or 0) >= n]
    criteria: list[Criterion] = []
    floor = cfg.subgroup_sensitivity_ci_floor
    if floor is not None:
        for r in checked:
            low = _low((r.get("ci") or {}).get("sensitivity"))
            criteria.append(Criterion(f"subgroup_sensitivity_ci_low[{attr}={r['group']}]", _rounded(low),
                                      f">= {floor} ({r['patients']} patients)", _ge(low, floor)))
        if not checked:
            criteria.append(Criterion(f"subgroup_sensitivity_ci_low[{attr}]", None,
                                      f">= {floor} in every {attr} group with >= {n} patients (none found)", False))
    margin = cfg.subgroup_auc_margin
    if margin is not None and evidence.champion_version is not None:
        champion = evidence.champion_subgroup_auc or {}
        pairs = [((r.get("metrics") or {}).get("auc"), champion.get(str(r["group"]))) for r in checked]
        pairs = [(new, old) for new, old in pairs if _finite(new) and _finite(old)]
        worst_new = min((new for new, _ in pairs), default=None)
        worst_old = min((old for _, old in pairs), default=None)
        bound = worst_old - margin if worst_old is not None else None
        criteria.append(Criterion("worst_subgroup_auc (non-inferiority)", _rounded(worst_new),
                                  f">= champion's worst {attr} group AUC {_rounded(worst_old)} - {margin} "
                                  f"({len(pairs)} groups with >= {n} patients)",
                                  bound is not None and _ge(worst_new, bound)))
    return criteria
