"""Classification metrics and their two artefacts: a JSON report and a confusion-matrix PNG.

scikit-learn computes the metrics (one well-tested implementation rather than our own); this
module only fixes which ones we report and how they are laid out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, loss, macro/weighted precision-recall-F1, per class, confusion matrix.

    Macro averages are the headline: UrbanSound8K is imbalanced (car_horn and gun_shot are
    rare) and accuracy alone hides a model that ignores them.
    """
    # here, not at the top: serving imports this module (through ``model``) but never scores
    # a test set, and scikit-learn costs every web and worker process ~1.5 s and ~40 MB
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = list(classes)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return {"n": 0}
    probs = softmax(np.asarray(logits, dtype=np.float64))
    pred = probs.argmax(axis=1)
    ids = list(range(len(classes)))
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), labels], 1e-12, None))))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    present = s > 0  # classes absent from this split would drag macro scores to zero
    wp, wr, wf, _ = precision_recall_fscore_support(
        labels, pred, labels=ids, average="weighted", zero_division=0)
    return {
        "n": n,
        "accuracy": float((pred == labels).mean()),
        "loss": loss,
        "macro_f1": float(f[present].mean()),
        "precision": float(p[present].mean()),
        "recall": float(r[present].mean()),
        "weighted_f1": float(wf),
        "weighted_precision": float(wp),
        "weighted_recall": float(wr),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        "classes": classes,
        "confusion_matrix": confusion_matrix(labels, pred, labels=ids).tolist(),
    }


def write_report(metrics: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def plot_confusion_matrix(metrics: dict[str, Any], path: Path | None = None,
                          title: str = "") -> Figure:
    """Row-normalised (recall per true class) with counts in the cells: readable at a glance
    even though classes have very different sizes. Returns the figure; saves it if asked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    classes = metrics["classes"]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
    return fig
