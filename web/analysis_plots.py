"""PNG images for the Analyse page: the recording's level over time with its events, and
seconds per class. Drawn like ``plots`` (``matplotlib.figure.Figure``, no pyplot state).

The timeline's axes fill the image's whole width (no side margins), so the page's clickable
SVG strip of events, drawn below it at the same width, lines up with it second for second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from src.preprocessing import CLASSES

from .plots import BLUE, GREY, png

#: One colour per class (matplotlib's tab10, in class order) and greys for the rest; the
#: page's stylesheet uses the same colours for the strip (``.ev-<n>``).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def colour_index(label: str) -> int:
    """``ev-<n>`` class of a label: its class index, 10 for uncertain, 11 for silence."""
    if label in CLASSES:
        return CLASSES.index(label)
    return 10 if label == "uncertain" else 11


def timeline_png(result: dict[str, Any]) -> bytes:
    """Level (dBFS) over time, events shaded in their class colour."""
    return png(timeline_figure(result))


def timeline_figure(result: dict[str, Any]) -> Figure:
    duration = max(float(result.get("duration_s") or 0.0), 1e-3)
    env = result.get("envelope") or {}
    levels = np.asarray(env.get("dbfs") or [], dtype=float)
    fig = Figure(figsize=(10, 1.8), dpi=100)
    ax = fig.add_axes((0.0, 0.18, 1.0, 0.82))
    for event in result.get("events") or []:
        colour = PALETTE[colour_index(event["label"]) % len(PALETTE)]
        ax.axvspan(event["start_s"], event["end_s"], color=colour, alpha=0.35, linewidth=0)
    if levels.size:
        t = (np.arange(levels.size) + 0.5) * float(env.get("step_s") or 0.0)
        floor = -90.0
        ax.fill_between(t, floor, np.maximum(levels, floor), color=BLUE, linewidth=0)
        ax.set_ylim(floor, max(0.0, float(levels.max()) + 3))
    ax.set_xlim(0, duration)
    ticks = [t for t in MaxNLocator(nbins=10).tick_values(0, duration) if 0 <= t <= duration]
    ax.set_xticks(ticks)
    # the axes reach both edges of the image: a centred label on the first or last tick would
    # be cut in half, so those two hang inwards from their tick
    for tick, label in zip(ticks, ax.get_xticklabels(), strict=True):
        if tick <= 0.03 * duration:
            label.set_horizontalalignment("left")
        elif tick >= 0.97 * duration:
            label.set_horizontalalignment("right")
    ax.tick_params(axis="x", direction="in", pad=-12, labelsize=7)
    ax.tick_params(axis="y", direction="in", pad=-22, labelsize=7)
    ax.set_facecolor("#fafbfc")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.text(0.002, 0.02, "level (dBFS) over time (s); shaded: events", fontsize=7, color=GREY)
    return fig


def summary_png(result: dict[str, Any]) -> bytes:
    """Seconds per label, most heard first (labels never heard are left out)."""
    summary = {k: v for k, v in (result.get("summary") or {}).items() if v > 0}
    items = sorted(summary.items(), key=lambda kv: kv[1], reverse=True)
    fig = Figure(figsize=(6, 1.3 + 0.3 * len(items)), dpi=100)
    ax = fig.add_subplot()
    if items:
        ax.barh([k.replace("_", " ") for k, _ in items], [v for _, v in items],
                color=[PALETTE[colour_index(k) % len(PALETTE)] if k in CLASSES else GREY
                       for k, _ in items])
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("Seconds per class", fontsize=10)
    fig.tight_layout()
    return png(fig)
