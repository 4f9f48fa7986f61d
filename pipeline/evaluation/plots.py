"""Evaluation figures (matplotlib, headless): ROC, PR, confusion matrix, reliability diagram,
per-slice table, decision curve and the Grad-CAM grid."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.evaluation.metrics import confusion_counts


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def evaluation_figures(result: Any, val: Any) -> dict[str, Any]:
    """Figures for an :class:`~pipeline.evaluation.evaluate.EvalResult` (closed, ready for ``mlflow.log_figure``)."""
    test = result.test
    figs: dict[str, Any] = {}
    if result.task == "binary":
        thr = result.operating_point["threshold"]
        figs["roc"] = roc_figure(test.y, test.proba, thr)
        figs["pr"] = pr_figure(test.y, test.proba, thr)
        figs["reliability"] = reliability_figure(test.y, test.proba)
        c = result.metrics["confusion"]
        figs["confusion"] = confusion_figure(np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]]), ["neg", "pos"])
    else:
        m = np.array(result.metrics["confusion"])
        figs["confusion"] = confusion_figure(m, [str(i) for i in range(len(m))])
    if result.slices:
        figs["slices"] = slice_table_figure(result.slices)
    if getattr(result, "decision_curve", None):
        figs["decision_curve"] = decision_curve_figure(result.decision_curve)
    return figs


def roc_figure(y: np.ndarray, p: np.ndarray, threshold: float) -> Any:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    if len(np.unique(y)) > 1:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label="ROC")
        c = confusion_counts(y, p >= threshold)
        sens = c["tp"] / max(1, c["tp"] + c["fn"])
        fp = c["fp"] / max(1, c["fp"] + c["tn"])
        ax.scatter([fp], [sens], color="red", zorder=3, label=f"operating point t={threshold:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    plt.close(fig)
    return fig


def pr_figure(y: np.ndarray, p: np.ndarray, threshold: float) -> Any:
    from sklearn.metrics import precision_recall_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    if y.sum() > 0:
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label="PR")
        c = confusion_counts(y, p >= threshold)
        ax.scatter([c["tp"] / max(1, c["tp"] + c["fn"])], [c["tp"] / max(1, c["tp"] + c["fp"])], color="red", zorder=3,
                   label=f"operating point t={threshold:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall (test)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    plt.close(fig)
    return fig


def reliability_figure(y: np.ndarray, p: np.ndarray, bins: int = 10) -> Any:
    plt = _plt()
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    conf = [p[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)]
    acc = [y[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(conf, acc, marker="o")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability (test)")
    fig.tight_layout()
    plt.close(fig)
    return fig


def decision_curve_figure(curve: dict[str, Any]) -> Any:
    """Net benefit of the model, treat-all and treat-none against the threshold probability."""
    plt = _plt()
    t = curve["thresholds"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(t, curve["model"], label="model")
    ax.plot(t, curve["treat_all"], "k:", lw=1, label="treat all")
    ax.plot(t, curve["treat_none"], "k-", lw=0.8, label="treat none")
    op = curve.get("operating_point")
    if op:
        ax.scatter([op["threshold"]], [op["net_benefit"]], color="red", zorder=3,
                   label=f"locked threshold {op['threshold']:.3f}")
    prevalence = curve.get("prevalence") or 0.0
    ax.set_ylim(-0.05, max(0.05, prevalence * 1.1))
    ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def confusion_figure(matrix: np.ndarray, labels: list[str]) -> Any:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(labels), 1.2 + 0.45 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, int(v), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion (test)")
    fig.tight_layout()
    plt.close(fig)
    return fig


def slice_table_figure(slices: list[dict[str, Any]]) -> Any:
    """Per-slice metrics as a table image (``n`` and the headline metrics of each slice)."""
    plt = _plt()
    keys = [k for k in ("auc", "sensitivity", "specificity", "accuracy", "macro_f1", "ece") if k in slices[0]]
    rows = [[s["slice"], s["value"], str(s["n"]), *("-" if s.get(k) is None else f"{s[k]:.3f}" for k in keys)]
            for s in slices]
    fig, ax = plt.subplots(figsize=(1.3 * (3 + len(keys)), 0.6 + 0.28 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=["slice", "value", "n", *keys], loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    ax.set_title("Per-slice metrics (test, locked threshold)", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def gradcam_grid_figure(cells: dict[str, list[dict[str, Any]]], sanity: dict[str, Any] | None = None,
                        method: str = "Grad-CAM") -> Any:
    """Rows = confusion cells (TP/FP/TN/FN or correct/wrong), columns = examples (the method's overlays)."""
    plt = _plt()
    ncols = max(1, max((len(v) for v in cells.values()), default=1))
    fig, axes = plt.subplots(len(cells), ncols, figsize=(1.9 * ncols + 0.6, 1.9 * len(cells) + 0.5), squeeze=False)
    for r, (cell, examples) in enumerate(cells.items()):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(examples):
                ax.imshow(examples[c]["overlay"])
                ax.set_title(f"p={examples[c]['proba']:.2f}", fontsize=7)
            else:
                ax.set_frame_on(False)
            if c == 0:
                ax.set_ylabel(f"{cell} ({len(examples)})", fontsize=9)
    title = f"{method} (test)"
    if sanity and sanity.get("rank_corr") is not None:
        title += f" — randomisation rank corr {sanity['rank_corr']:.2f} ({'pass' if sanity['passed'] else 'FAIL'})"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
