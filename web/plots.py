"""PNG images for the pages: a clip's log-mel, production metrics, confusion matrices.

All drawn with ``matplotlib.figure.Figure`` (no pyplot, so no global state shared between
request threads) and returned as PNG bytes; the pages embed or link them. Nothing here is
heavy: a production plot is a few bars drawn from the metric summary.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from src.preprocessing import CLASSES, channel_names

BLUE, ORANGE, GREY = "#1f5f99", "#d9822b", "#5f6b73"
_cm_lock = threading.Lock()


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


#: how the Predict page names the front end's other channels (``FeatureConfig.frontend``)
def spectrogram_title(frontend: str) -> str:
    """The image shows the log-mel channel only; the title must not claim it is all the model
    sees when the front end stacks more channels beside it."""
    others = channel_names(frontend)[1:]
    if not others:
        return "Log-mel spectrogram (what the model sees)"
    return f"Log-mel spectrogram (the model also sees its {' and '.join(others)} image)"


def spectrogram_png(logmel: np.ndarray, sample_rate: int, hop: int) -> bytes:
    """The log-mel the model saw (dB), time in seconds, mel bands bottom to top."""
    fig = Figure(figsize=(7, 2.6), dpi=100)
    ax = fig.add_subplot()
    seconds = logmel.shape[1] * hop / sample_rate
    top = float(logmel.max())
    image = ax.imshow(logmel, origin="lower", aspect="auto", cmap="magma", vmin=top - 80,
                      vmax=top, extent=(0, seconds, 0, logmel.shape[0]))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel band")
    ax.set_title("Log-mel spectrogram", fontsize=10)  # the page's heading says what else
    fig.colorbar(image, ax=ax, label="dB", fraction=0.04)
    fig.tight_layout()
    return png(fig)


def latency_png(summary: dict[str, Any]) -> bytes:
    """Server-side predict latency: the histogram of all workers, p50/p95/p99 in the title."""
    lat = summary.get("latency_ms", {}).get("predict", {})
    rows = [r for r in lat.get("histogram", []) if r["upper_ms"] is not None]
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    if rows:
        ax.bar(range(len(rows)), [r["count"] for r in rows], color=BLUE)
        ax.set_xticks(range(len(rows)), [f"{r['upper_ms']:g}" for r in rows], rotation=60,
                      fontsize=7)
    ax.set_xlabel("latency up to (ms)")
    ax.set_ylabel("predictions")
    ax.set_title("Predict latency: p50 {} / p95 {} / p99 {} ms".format(
        *(lat.get(k) if lat.get(k) is not None else "–" for k in ("p50", "p95", "p99"))),
        fontsize=10)
    fig.tight_layout()
    return png(fig)


def class_mix_png(summary: dict[str, Any]) -> bytes:
    """Predicted-class share in production beside the training mix (drift at a glance)."""
    drift = summary.get("drift", {})
    rows = {r["class"]: r for r in drift.get("classes", [])}
    classes = [c for c in CLASSES if c in rows] or list(CLASSES)
    production = [rows.get(c, {}).get("production", 0.0) for c in classes]
    training = [rows.get(c, {}).get("training", 0.0) for c in classes]
    y = np.arange(len(classes))
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    ax.barh(y - 0.2, production, height=0.4, color=BLUE, label="production (predicted)")
    ax.barh(y + 0.2, training, height=0.4, color=ORANGE, label="training set")
    ax.set_yticks(y, classes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of clips")
    js = drift.get("js_distance")
    ax.set_title("Class mix" + (f" (JS distance {js:.2f})" if js is not None else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return png(fig)


def confidence_png(summary: dict[str, Any]) -> bytes:
    """How sure the model is in production: the histogram of top-class probabilities."""
    hist = summary.get("confidence", {}).get("histogram", [])
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    if hist:
        uppers = [h["upper"] for h in hist]
        ax.bar([u - 0.025 for u in uppers], [h["count"] for h in hist], width=0.045, color=BLUE)
    accuracy = (summary.get("model", {}).get("metrics") or {}).get("accuracy")
    if accuracy is not None:
        ax.axvline(accuracy, color=ORANGE, linestyle="--", label=f"test accuracy {accuracy:.2f}")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("predictions")
    mean = summary.get("confidence", {}).get("mean")
    ax.set_title("Confidence" + (f" (mean {mean:.2f})" if mean is not None else ""), fontsize=10)
    fig.tight_layout()
    return png(fig)


def requests_png(summary: dict[str, Any]) -> bytes:
    """Requests per endpoint, so the error rate has its denominator in view."""
    by = summary.get("requests", {}).get("by_endpoint", {})
    items = sorted(by.items(), key=lambda kv: kv[1], reverse=True)[:10]
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items], color=GREY)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("requests")
    rate = summary.get("error_rate", 0.0)
    ax.set_title(f"Requests (server error rate {100 * rate:.2f}%)", fontsize=10)
    fig.tight_layout()
    return png(fig)


DASHBOARD_PLOTS = {
    "latency": ("Predict latency", latency_png),
    "class_mix": ("Predicted classes vs training mix", class_mix_png),
    "confidence": ("Confidence distribution", confidence_png),
    "requests": ("Requests per endpoint", requests_png),
}


def confusion_png(metrics: dict[str, Any], cache: Path, version: str) -> Path:
    """A version's confusion matrix, drawn once (versions are immutable) by the same function
    the CLI report uses; pyplot inside it is serialised by a lock."""
    path = cache / f"{version}-confusion.png"
    if path.is_file():
        return path
    from src.evaluation import plot_confusion_matrix

    cache.mkdir(parents=True, exist_ok=True)
    with _cm_lock:
        if not path.is_file():
            tmp = path.with_suffix(f".{threading.get_ident()}.png")
            plot_confusion_matrix(metrics, tmp, title=f"{version}: accuracy "
                                  f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
            tmp.replace(path)
    return path
