"""The reviewer-facing parts of an evidence pack: the checklist, the change envelope, the diff, the HTML.

:func:`checklist` maps items of two reporting standards, plus three governance items, to the pack
section and the artefacts that answer them, each with a status: ``answered`` / ``partly`` /
``not_available`` (the pipeline answers the item but this version has no record of it) /
``study_team`` (not answered by the pipeline by design: to be completed by the study team; the
note says why). The mapping lists the items the pipeline answers in full or in part and the
central items it cannot answer; it is not the whole checklist, which the study team completes.

Item numbers and titles were checked (2026-12-01) against:

* **CLAIM 2024**: Tejani AS, Klontzas ME, Gatti AA, Mongan JT, Moy L, Park SH, Kahn CE Jr.
  "Checklist for Artificial Intelligence in Medical Imaging (CLAIM): 2024 Update." Radiology:
  Artificial Intelligence 2024;6(4):e240300, https://doi.org/10.1148/ryai.240300 (PMC11304031);
  44 items. The RSNA article itself could not be reached from this machine: the numbering was
  read from three independent public transcriptions of its checklist that agree item by item (one
  states it was compared 44/44 against PMC11304031), and their titles are used here, shortened.
  Note that the 2024 numbering differs from CLAIM 2020 (42 items) from item 11 on: e.g.
  de-identification is 11 (12 in 2020), internal / external testing are 32 / 33, the numbers
  included and excluded 35, demographics per partition 36, failure analysis 39.
* **TRIPOD+AI**: Collins GS, Moons KGM, Dhiman P, et al. "TRIPOD+AI statement: updated guidance
  for reporting clinical prediction models that use regression or machine learning methods."
  BMJ 2024;385:e078378, https://doi.org/10.1136/bmj-2023-078378 (checklist also at
  https://www.tripod-statement.org/); 27 items, 52 sub-items. Checked against two independent
  verbatim transcriptions of the published checklist (CC BY 4.0), which agree with each other.

Titles are short forms of the published item titles; the note says what the pipeline covers and
what it leaves to the study team. All functions here are pure: the pack dict in, JSON-able values
or HTML out.
"""

from __future__ import annotations

import hashlib
import html
import json
from typing import Any

from pipeline.config import Settings

ANSWERED, PARTLY, NOT_AVAILABLE, STUDY_TEAM = "answered", "partly", "not_available", "study_team"
STUDY_TEAM_NOTE = "not answered by the pipeline: to be completed by the study team"

CLAIM, TRIPOD, GOVERNANCE = "CLAIM 2024", "TRIPOD+AI", "governance"
# The item numbers the published checklists have (CLAIM 2024: 1-44; TRIPOD+AI: 27 items, 52 sub-items).
CLAIM_2024_ITEMS = tuple(str(n) for n in range(1, 45))
TRIPOD_AI_ITEMS = ("1", "2", "3a", "3b", "3c", "4", "5a", "5b", "6a", "6b", "6c", "7", "8a", "8b", "8c", "9a", "9b",
                   "9c", "10", "11", "12a", "12b", "12c", "12d", "12e", "12f", "12g", "13", "14", "15", "16", "17",
                   "18a", "18b", "18c", "18d", "18e", "18f", "19", "20a", "20b", "20c", "21", "22", "23a", "23b",
                   "24", "25", "26", "27a", "27b", "27c")

# (standard, item, title, sections, note when only partly answered by design; None = fully answerable).
# No sections = not answered by the pipeline (status study_team, the note says why).
ITEMS: tuple[tuple[str, str, str, tuple[str, ...], str | None], ...] = (
    (CLAIM, "7", "Data sources", ("provenance",), None),
    (CLAIM, "8", "Inclusion and exclusion criteria", ("flow",), None),
    (CLAIM, "11", "De-identification methods", ("deidentification",), None),
    (CLAIM, "14", "Definition of method(s) used to obtain the reference standard", ("provenance",),
     "labels come from the data source's label mapping; no adjudication or annotator record is kept"),
    (CLAIM, "17", "Annotation of test set", ("provenance",),
     "test labels come from the same source label mapping as training labels; no separate test-set annotation"),
    (CLAIM, "18", "Measures of inter- and intrarater variability", (),
     "not measured by the pipeline: one label per image"),
    (CLAIM, "19", "How data were assigned to partitions (proportions)", ("leakage",), None),
    (CLAIM, "20", "Level at which partitions are disjoint (patient)", ("leakage",), None),
    (CLAIM, "21", "Intended sample size (testing data)", (),
     "no sample-size calculation in the pipeline; the test partition's achieved size is in #demographics"),
    (CLAIM, "22", "Detailed description of model (inputs, outputs, architecture)", ("model",), None),
    (CLAIM, "23", "Software libraries, frameworks, and packages", ("software",), None),
    (CLAIM, "24", "Initialization of model parameters (train.weights)", ("training",), None),
    (CLAIM, "25", "Details of training approach (hyperparameters, seed, code version)", ("training",), None),
    (CLAIM, "26", "Method of selecting the final model (best validation checkpoint, promotion gate)",
     ("training", "gate"), None),
    (CLAIM, "28", "Metrics of model performance", ("metrics",), None),
    (CLAIM, "29", "Statistical measures of significance and uncertainty (CIs)", ("metrics",), None),
    (CLAIM, "30", "Robustness or sensitivity analysis (shortcut test)", ("failure_analysis",), None),
    (CLAIM, "31", "Methods for explainability or interpretability, and their validation", ("explanations",), None),
    (CLAIM, "32", "Evaluation on internal data (held-out test partition)", ("metrics",), None),
    (CLAIM, "33", "Testing on external data", (), "single data source: no external test set"),
    (CLAIM, "35", "Numbers of patients or examinations included and excluded (flow diagram)", ("flow",), None),
    (CLAIM, "36", "Demographic and clinical characteristics of cases in each partition", ("demographics",), None),
    (CLAIM, "37", "Performance metrics and measures of statistical uncertainty", ("metrics", "subgroups"),
     "on the test partition and its subgroups; training and validation curves stay in the training run"),
    (CLAIM, "38", "Estimates of diagnostic performance and their precision (with calibration)",
     ("metrics", "calibration"), None),
    (CLAIM, "39", "Failure analysis of incorrectly classified cases", ("failure_analysis",), None),
    (CLAIM, "40", "Study limitations", ("model_card",),
     "the model card's known limitations; the study's own limitations are the study team's"),
    (CLAIM, "41", "Implications for practice, including intended use and/or clinical role", ("model_card",),
     "the model card's intended use; implications for practice are the study team's"),
    (CLAIM, "43", "Availability of software, trained model, and/or data", (),
     "the pack records where the model and code version are; whether and how they are shared is the study team's"),
    (TRIPOD, "5a", "Sources of data (development and evaluation)", ("provenance",),
     "source and dataset versions; the rationale and representativeness are the study team's"),
    (TRIPOD, "6b", "Eligibility criteria for study participants", ("flow",), None),
    (TRIPOD, "10", "Sample size", (), "no sample-size calculation in the pipeline"),
    (TRIPOD, "12a", "How the data were used in the analysis, including partitioning", ("leakage",), None),
    (TRIPOD, "12c", "Type of model, model-building steps, hyperparameter tuning, internal validation",
     ("model", "training"), None),
    (TRIPOD, "12e", "Measures and plots to evaluate performance (discrimination, calibration, clinical utility)",
     ("metrics", "calibration"), None),
    (TRIPOD, "12f", "Model updating arising from the model evaluation", ("change_envelope",),
     "the change envelope fixes how later versions may be retrained and their acceptance criteria; "
     "no recalibration arising from this evaluation is performed"),
    (TRIPOD, "13", "Class imbalance methods", ("training",),
     "whether inverse-frequency class weights were used (train.class_weights); the rationale is the study team's"),
    (TRIPOD, "14", "Fairness: approaches used to address model fairness (subgroup criteria of the gate)",
     ("subgroups", "gate"), None),
    (TRIPOD, "15", "Model output, and how the classification threshold was identified", ("threshold",), None),
    (TRIPOD, "17", "Ethical approval", (), "ethics approval and consent or waiver are outside the pipeline"),
    (TRIPOD, "20a", "Flow of participants through the study", ("flow",), None),
    (TRIPOD, "20b", "Characteristics of the participants (demographics, outcome events)", ("demographics",), None),
    (TRIPOD, "21", "Number of participants and outcome events in each analysis", ("demographics",), None),
    (TRIPOD, "22", "Full model specification (code, object, API)", ("model",),
     "the SavedModel and ONNX locations; access restrictions and reuse terms are the study team's"),
    (TRIPOD, "23a", "Model performance estimates with confidence intervals, including key subgroups",
     ("metrics", "subgroups"), None),
    (TRIPOD, "23b", "Heterogeneity in model performance across clusters (sites)", ("subgroups",), None),
    (TRIPOD, "24", "Results of model updating (versus the previous model)", ("diff",), None),
    (GOVERNANCE, "G1", "Gate decision on this version", ("gate",), None),
    (GOVERNANCE, "G2", "Human approval (reviewer, time, reason)", ("approval",), None),
    (GOVERNANCE, "G3", "Audit log records of this version, chain head", ("audit",), None),
)


def checklist(sections: dict[str, Any], links: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    """One row per item: status and the artefacts that answer it (a pack section anchor first)."""
    rows = []
    for standard, item, title, keys, note in ITEMS:
        present = [k for k in keys if _filled(sections.get(k), k)]
        if not keys:
            status, note = STUDY_TEAM, f"{STUDY_TEAM_NOTE} ({note})" if note else STUDY_TEAM_NOTE
        elif not present:
            status = NOT_AVAILABLE
        elif note or len(present) < len(keys) or any(_partial(sections.get(k), k) for k in present):
            status = PARTLY
        else:
            status = ANSWERED
        artefacts = [{"kind": "section", "path": f"#{k}"} for k in present]
        artefacts += [a for k in present for a in links.get(k, [])]
        rows.append({"standard": standard, "item": item, "title": title, "status": status, "sections": list(keys),
                     "note": note or ("" if present or not keys else "not recorded for this version"),
                     "artefacts": artefacts})
    return rows


def _filled(section: Any, key: str) -> bool:
    if not section:
        return False
    if key == "approval":
        return section.get("status") != "none" or not section.get("required")
    return True


def _partial(section: Any, key: str) -> bool:
    """Sections present but incomplete: the summary missing, the approval not yet decided, a broken audit chain."""
    if key == "provenance":
        return not section.get("summary_available")
    if key == "approval":
        return section.get("status") == "none"
    if key == "audit":
        return not section.get("chain_ok")
    return False


# --------------------------------------------------------------------------- change envelope


def change_envelope(settings: Settings, sections: dict[str, Any]) -> dict[str, Any]:
    """What the next version may change without a new review, and the acceptance criteria fixed now."""
    m, p, op = sections["model"], settings.promote, sections.get("threshold") or {}
    acceptance = {"min_auc": p.min_auc, "min_accuracy": p.min_accuracy,
                  "sensitivity_ci_floor": p.sensitivity_ci_floor, "auc_margin_non_inferiority": p.auc_margin,
                  "require_superiority": p.require_superiority, "max_ece": p.max_ece,
                  "subgroup_by": p.subgroup_by, "subgroup_min_patients": p.subgroup_min_patients,
                  "subgroup_sensitivity_ci_floor": p.subgroup_sensitivity_ci_floor,
                  "subgroup_auc_margin": p.subgroup_auc_margin, "require_approval": p.require_approval,
                  "split": "patient-level, certificate verified, zero patient overlap, data validation passed"}
    fixed = {"architecture": m.get("architecture"), "input": m.get("input"), "classes": m.get("classes"),
             "positive_class": m.get("positive_class"), "data_source": (sections.get("provenance") or {}).get("source"),
             "threshold_policy": op.get("policy"), "threshold_criterion": op.get("criterion")}
    digest = hashlib.sha256(json.dumps({"acceptance": acceptance, "fixed": fixed}, sort_keys=True,
                                       default=str).encode()).hexdigest()
    return {
        "may_change_without_review": [
            f"the weights: retraining architecture `{fixed['architecture']}` with the same input and classes",
            "the data: more or newer images from the same source under the same admission policy and "
            "de-identification (the dataset hash changes)",
            "training settings: seed, epochs, batch size, learning rate, augmentation",
            "the operating threshold, re-derived by the same policy and criterion on the validation split"],
        "requires_new_review": [
            "another architecture family, input size, channel count, classes or positive class",
            "a new data source, site or population, or a changed admission / de-identification policy",
            "another threshold policy or criterion", "any acceptance criterion below made weaker",
            "a change of intended use"],
        "fixed": fixed, "acceptance_criteria": acceptance, "envelope_sha256": digest}


# --------------------------------------------------------------------------- diff against the champion's pack

DIFF_SUBGROUP_KEYS = ("auc", "sensitivity", "specificity")


def diff_packs(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """What changed from ``old`` (the champion's pack) to ``new``: metrics, subgroups, data, software, envelope."""
    ns, os_ = new["sections"], old["sections"]
    nv, ov = (ns.get("metrics") or {}).get("values", {}), (os_.get("metrics") or {}).get("values", {})
    metrics = {k: {"champion": ov[k], "this": nv[k], "delta": round(nv[k] - ov[k], 4)}
               for k in sorted(set(nv) & set(ov))}
    old_groups = {(g["attribute"], g["group"]): g for g in (os_.get("subgroups") or {}).get("groups", [])}
    groups = []
    for g in (ns.get("subgroups") or {}).get("groups", []):
        o = old_groups.get((g["attribute"], g["group"]))
        if o is None:
            continue
        deltas = {k: round(g["metrics"][k] - o["metrics"][k], 4) for k in DIFF_SUBGROUP_KEYS
                  if _num(g["metrics"].get(k)) and _num(o["metrics"].get(k))}
        groups.append({"attribute": g["attribute"], "group": g["group"], "delta": deltas})
    data = {k: {"champion": (os_.get(sec) or {}).get(k), "this": (ns.get(sec) or {}).get(k)}
            for sec, k in (("provenance", "dataset_hash"), ("provenance", "dvc_md5"), ("provenance", "dvc_rev"),
                           ("leakage", "certificate_sha256"))}
    for entry in data.values():
        entry["changed"] = entry["champion"] != entry["this"]
    npk, opk = (ns.get("software") or {}).get("packages", {}), (os_.get("software") or {}).get("packages", {})
    software = {k: {"champion": opk.get(k), "this": npk.get(k)} for k in sorted(set(npk) | set(opk))
                if npk.get(k) != opk.get(k)}
    for key in ("python",):
        if (ns.get("software") or {}).get(key) != (os_.get("software") or {}).get(key):
            software[key] = {"champion": os_["software"].get(key), "this": ns["software"].get(key)}
    code = {"champion": (os_.get("training") or {}).get("git_commit"),
            "this": (ns.get("training") or {}).get("git_commit")}
    fixed_old, fixed_new = old["change_envelope"]["fixed"], new["change_envelope"]["fixed"]
    breaches = [k for k in fixed_old if fixed_old[k] != fixed_new.get(k)]
    return {"champion_version": old["version"], "metrics": metrics, "subgroups": groups, "data": data,
            "software": software, "code": code,
            "threshold": {"champion": (os_.get("threshold") or {}).get("threshold"),
                          "this": (ns.get("threshold") or {}).get("threshold")},
            "within_champion_envelope": not breaches, "envelope_breaches": breaches}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v


# --------------------------------------------------------------------------- HTML

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;"
         "vertical-align:top}th{background:#f3f3f3}.answered{color:#176117}.partly{color:#9a6a00}"
         ".not_available{color:#a11}.study_team{color:#555}code{font-size:12px}")


def render_html(pack: dict[str, Any]) -> str:
    """One self-contained HTML page (no scripts, no external resources)."""
    title = f"Evidence pack — {pack['model']} v{pack['version']}"
    s = pack["sections"]
    parts = [f"<h1>{_e(title)}</h1><p>Generated {_e(pack['generated_at'])}; run <code>{_e(pack['run_id'])}</code>; "
             f"JSON: <code>{_e(pack['files']['json'])}</code>. Aggregate values and de-identified ids only.</p>",
             _checklist_html(pack["items"]), _section("flow", "Inclusion / exclusion flow", _flow_svg(s.get("flow"))),
             _section("demographics", "Demographics per split", _demographics_html(s.get("demographics")))]
    for key, heading in (("provenance", "Data provenance"), ("deidentification", "De-identification"),
                         ("leakage", "Leakage certificate"), ("model", "Model"), ("training", "Training"),
                         ("metrics", "Metrics (test split, patient-level bootstrap CIs)"),
                         ("subgroups", "Subgroup performance"), ("calibration", "Calibration"),
                         ("failure_analysis", "Failure analysis"), ("explanations", "Explanation validation"),
                         ("software", "Software"), ("threshold", "Threshold derivation"),
                         ("gate", "Gate decision"), ("approval", "Approval"), ("audit", "Audit log"),
                         ("model_card", "Model card")):
        parts.append(_section(key, heading, _value(s.get(key)) if s.get(key) else "<p>not available</p>"))
    parts.append(_section("change_envelope", "Change envelope for the next version", _value(pack["change_envelope"])))
    diff = pack.get("diff")
    parts.append(_section("diff", "Diff against the champion's pack",
                          _value(diff) if diff else "<p>no champion to compare with</p>"))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _section(anchor: str, heading: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{_e(heading)}</h2>{body}</section>"


def _checklist_html(items: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_e(i['standard'])}</td><td>{_e(i['item'])}</td><td>{_e(i['title'])}</td>"
        f"<td class='{i['status']}'>{_e(i['status'])}</td><td>{_artefacts(i['artefacts'])}"
        f"{'<br><i>' + _e(i['note']) + '</i>' if i['note'] else ''}</td></tr>" for i in items)
    return ("<section id='checklist'><h2>Reporting checklist</h2><table><tr><th>standard</th><th>item</th>"
            f"<th>topic</th><th>status</th><th>answered by</th></tr>{rows}</table></section>")


def _artefacts(artefacts: list[dict[str, str]]) -> str:
    out = []
    for a in artefacts:
        if a["kind"] == "section":
            out.append(f"<a href='{_e(a['path'])}'>{_e(a['path'])}</a>")
        elif a["kind"] == "file":
            out.append(f"<a href='file://{_e(a['path'])}'><code>{_e(a['path'])}</code></a>")
        else:
            out.append(f"<code>{_e(a.get('uri') or a['path'])}</code>")
    return "<br>".join(out)


def _flow_svg(f: dict[str, Any] | None) -> str:
    """Boxes top to bottom: found → exclusions → ingested → split sizes (text rows, as an SVG)."""
    if not f:
        return "<p>not available (no ingest summary on this machine)</p>"
    lines = [(f"Files found: {f['files_found']}", 0),
             (f"Excluded by label mapping: {f['excluded_by_label_mapping']}", 1),
             (f"Excluded by admission policy: {sum(f['excluded_by_policy'].values())}", 1),
             *[(f"{k}: {v}", 2) for k, v in sorted(f["excluded_by_policy"].items())],
             (f"Quarantined: {sum(f['quarantined'].values())}", 1),
             *[(f"{k}: {v}", 2) for k, v in sorted(f["quarantined"].items())],
             (f"Ingested: {f['ingested']}", 0),
             *[(f"{k}: {v} images, {f['split_patients'].get(k, '?')} patients", 1)
               for k, v in f["split_images"].items()]]
    if f.get("dropped_at_split"):
        lines.append((f"dropped at split (near-duplicates): {f['dropped_at_split']}", 1))
    height = 24 * len(lines) + 10
    rows = "".join(f"<rect x='{10 + 30 * d}' y='{5 + 24 * n}' width='{440 - 30 * d}' height='20' fill='"
                   f"{'#e8f0fb' if d == 0 else '#fafafa'}' stroke='#888'/><text x='{16 + 30 * d}' y='{19 + 24 * n}' "
                   f"font-size='12'>{_e(text)}</text>" for n, (text, d) in enumerate(lines))
    return f"<svg xmlns='http://www.w3.org/2000/svg' width='470' height='{height}'>{rows}</svg>"


def _demographics_html(d: dict[str, Any] | None) -> str:
    if not d:
        return "<p>not available (no manifest or split on this machine)</p>"
    splits = list(d["images"])
    head = "<tr><th>attribute</th><th>value</th>" + "".join(f"<th>{_e(s)}</th>" for s in splits) + "</tr>"
    rows = ["<tr><td colspan=2>images / patients</td>"
            + "".join(f"<td>{d['images'][s]} / {d['patients'][s]}</td>" for s in splits) + "</tr>"]
    rows += [f"<tr><td>{_e(attr)}</td><td>{_e(value)}</td>" + "".join(f"<td>{n[s]}</td>" for s in splits) + "</tr>"
             for attr, values in d["by"].items() for value, n in values.items()]
    return f"<p>Image counts per split.</p><table>{head}{''.join(rows)}</table>"


def _value(v: Any, depth: int = 0) -> str:
    """A nested value as definition tables / lists (lists of flat dicts become one table)."""
    if isinstance(v, dict):
        if not v:
            return "-"
        return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_value(x, depth + 1)}</td></tr>"
                                   for k, x in v.items()) + "</table>"
    if isinstance(v, list):
        if v and all(isinstance(x, dict) for x in v):
            keys = list(dict.fromkeys(k for x in v for k in x))
            return ("<table><tr>" + "".join(f"<th>{_e(k)}</th>" for k in keys) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{_value(x.get(k), depth + 1)}</td>" for k in keys) + "</tr>"
                              for x in v) + "</table>")
        return ", ".join(_value(x, depth + 1) for x in v) or "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v) if v is not None else "-"
