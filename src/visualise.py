"""Data set visualisations, each a matplotlib figure plus an interpretation computed from the
numbers it shows (shared by the web app's Data page and the notebook).

``compute_stats`` reads every clip's header (duration, rate, channels: cheap, so all clips)
and decodes a deterministic sample of up to ``max_per_class`` clips per class for the
content statistics (loudness, spectral centroid, mean log-mel), which is what makes a full
UrbanSound8K copy take seconds rather than minutes. The log-mel images come from the model's
own front end (``preprocessing.LogMel`` on ``load_clip``), so they show what the CNN sees.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never pyplot:
no global state, so web threads can draw concurrently and notebooks display them as usual.
``render_all`` caches PNGs and texts under ``cache_dir/visualise/<signature>/``, keyed by a
signature of the data (paths, sizes, mtimes) and of this module's statistics version, so a page
shows them instantly and a changed data set is recomputed once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .datasets import Clip, read_dataset
from .preprocessing import (
    CLASSES,
    CLIP_SECONDS,
    AudioError,
    FeatureConfig,
    decode,
    fix_length,
    normalise_level,
    probe,
    resample,
    to_mono,
)

STATS_VERSION = 1  # bump when compute_stats changes what it measures
# boxplot's keywords moved: ``labels`` → ``tick_labels`` (3.9), ``vert=False`` →
# ``orientation`` (3.10; ``vert`` deprecated in 3.11). pyproject allows matplotlib >= 3.8.
_MPL = tuple(int(part) for part in matplotlib.__version__.split(".")[:2])
HORIZONTAL = {"orientation": "horizontal"} if _MPL >= (3, 10) else {"vert": False}
TICK_LABELS = "tick_labels" if _MPL >= (3, 9) else "labels"
PALETTE = ("#1f5f99", "#d9822b", "#3a8f4b", "#b03a48", "#6c4f9c", "#8c6d31", "#c1579a",
           "#5f6b73", "#a8a23a", "#2d9c9c")


@dataclass
class DatasetStats:
    """Per-clip header facts for all clips and content facts for a sample of them."""

    root: str
    labels: list[str]
    splits: list[str]
    durations: np.ndarray
    sample_rates: np.ndarray
    channels: np.ndarray
    subtypes: list[str]
    sample_labels: list[str] = field(default_factory=list)
    loudness_dbfs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    centroid_hz: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mean_logmel: dict[str, np.ndarray] = field(default_factory=dict)
    mel_hz: np.ndarray = field(default_factory=lambda: np.zeros(0))
    unreadable: int = 0
    synthetic: bool = False

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def name(self) -> str:
        return "synthetic demo set (not UrbanSound8K)" if self.synthetic else "data set"


# --------------------------------------------------------------------------- statistics

def _split_of(clip: Clip, root: Path) -> str:
    """``train``/``test`` folders win over folds (the synthetic set has both); else the fold."""
    try:
        first = clip.path.relative_to(root).parts[0]
    except ValueError:
        first = ""
    if first in ("train", "test"):
        return first
    return f"fold {clip.fold}" if clip.fold is not None else "all"


def _split_key(split: str) -> tuple[int, int, str]:
    order = {"train": 0, "test": 1}
    if split.startswith("fold "):
        return 2, int(split[5:]), split
    return order.get(split, 3), 0, split


def _sample(clips: list[Clip], max_per_class: int) -> list[int]:
    """Evenly spaced indices per class: deterministic, and spread over folds/recordings."""
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(clips):
        by_class.setdefault(c.label, []).append(i)
    picked = []
    for idx in by_class.values():
        if len(idx) <= max_per_class:
            picked += idx
        else:
            picked += [idx[int(j)] for j in np.linspace(0, len(idx) - 1, max_per_class)]
    return sorted(picked)


def _content(path: Path, config: FeatureConfig) -> tuple[float, float, np.ndarray]:
    """Raw loudness (dBFS), spectral centroid (Hz) and the fixed-length model waveform."""
    data, sr = decode(path, max_seconds=config.clip_seconds)
    y = to_mono(data)
    if y.size == 0:
        raise AudioError("empty", "no samples")
    rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
    loudness = 20 * np.log10(max(rms, 1e-10))
    y = resample(y, sr, config.sample_rate)
    power = np.abs(np.fft.rfft(y.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(y.size, 1 / config.sample_rate)
    centroid = float((freqs * power).sum() / max(power.sum(), 1e-20))
    wave = fix_length(normalise_level(y, config.target_dbfs), config.n_samples, config.pad_mode)
    return loudness, centroid, wave


def compute_stats(root: str | Path, max_per_class: int = 40) -> DatasetStats:
    """Statistics of the data set at ``root`` (either layout ``datasets.read_dataset`` reads)."""
    import torch

    from .preprocessing import LogMel, _hz_to_mel, _mel_to_hz

    root = Path(root)
    clips = read_dataset(root)
    durations, rates, channels, subtypes, keep = [], [], [], [], []
    unreadable = 0
    for i, clip in enumerate(clips):
        try:
            info = probe(clip.path)
        except AudioError:
            unreadable += 1
            continue
        keep.append(i)
        durations.append(info.duration)
        rates.append(info.samplerate)
        channels.append(info.channels)
        subtypes.append(info.subtype)
    clips = [clips[i] for i in keep]
    stats = DatasetStats(
        root=str(root), labels=[c.label for c in clips],
        splits=[_split_of(c, root) for c in clips], durations=np.array(durations),
        sample_rates=np.array(rates, dtype=np.int64), channels=np.array(channels, dtype=np.int64),
        subtypes=subtypes, unreadable=unreadable,
        synthetic=bool(clips) and all(c.source == "synthetic" for c in clips),
    )
    config = FeatureConfig()
    front_end = LogMel(config)
    sums: dict[str, np.ndarray] = {}
    counts: Counter[str] = Counter()
    loud, cent, labels = [], [], []
    for i in _sample(clips, max_per_class):
        try:
            loudness, centroid, wave = _content(clips[i].path, config)
        except AudioError:
            stats.unreadable += 1
            continue
        with torch.inference_mode():
            image = front_end(torch.from_numpy(wave).unsqueeze(0))[0, 0].numpy()
        label = clips[i].label
        sums[label] = sums.get(label, 0) + image.astype(np.float64)
        counts[label] += 1
        loud.append(loudness)
        cent.append(centroid)
        labels.append(label)
    stats.sample_labels = labels
    stats.loudness_dbfs = np.array(loud)
    stats.centroid_hz = np.array(cent)
    stats.mean_logmel = {k: (v / counts[k]).astype(np.float32) for k, v in sums.items()}
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array([config.fmin]))[0],
                                   _hz_to_mel(np.array([config.fmax]))[0], config.n_mels + 2))
    stats.mel_hz = edges[1:-1]
    return stats


def _ordered(labels: list[str]) -> list[str]:
    present = set(labels)
    return [c for c in CLASSES if c in present] + sorted(present - set(CLASSES))


def _hz(f: float) -> str:
    if f >= 1000:
        return f"{f / 1000:.2f}".rstrip("0").rstrip(".") + " kHz"
    return f"{f:.0f} Hz"


# --------------------------------------------------------------------------- the visualisations

def class_distribution(stats: DatasetStats) -> tuple[Figure, str]:
    """Clips per class (stacked by split when there are train/test folders or folds)."""
    classes = _ordered(stats.labels)
    splits = sorted(set(stats.splits), key=_split_key)
    counts = Counter(zip(stats.labels, stats.splits, strict=True))
    totals = Counter(stats.labels)
    fig = Figure(figsize=(8, 4.2), dpi=100)
    ax = fig.add_subplot()
    bottom = np.zeros(len(classes))
    stacked = len(splits) <= 10
    for k, split in enumerate(splits if stacked else ["all"]):
        values = np.array([counts[(c, split)] if stacked else totals[c] for c in classes], float)
        ax.bar(classes, values, bottom=bottom, label=split, color=PALETTE[k % len(PALETTE)])
        bottom += values
    ax.set_ylabel("clips")
    ax.set_title(f"Clips per class ({stats.n} in all)")
    ax.tick_params(axis="x", labelrotation=40, labelsize=8)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    if stacked and len(splits) > 1:
        ax.legend(fontsize=8, ncols=2 if len(splits) > 4 else 1)
    fig.tight_layout()

    if not classes:
        return fig, "No clips found."
    most, least = max(classes, key=totals.__getitem__), min(classes, key=totals.__getitem__)
    ratio = totals[most] / max(totals[least], 1)
    mean = stats.n / len(classes)
    rare = [c for c in classes if totals[c] < 0.6 * mean]
    text = f"{stats.n} clips of the {stats.name} over {len(classes)} classes."
    if ratio < 1.5:
        text += f" Every class has between {totals[least]} and {totals[most]} clips."
    else:
        text += (f" The largest class, {most} ({totals[most]}), has {ratio:.1f}× as many clips "
                 f"as the smallest, {least} ({totals[least]}).")
    if rare:
        text += (f" {', '.join(rare)} {'is' if len(rare) == 1 else 'are'} well below the average "
                 f"of {mean:.0f} per class, so accuracy alone would hide how the model does on "
                 f"{'it' if len(rare) == 1 else 'them'}: macro-F1 and class weighting matter.")
    elif ratio < 1.5:
        text += " The classes are close to balanced, so accuracy and macro-F1 tell a similar story."
    if len(splits) > 1:
        text += f" Splits: {', '.join(f'{s} {stats.splits.count(s)}' for s in splits)}."
    return fig, text


def duration_and_rate(stats: DatasetStats) -> tuple[Figure, str]:
    """How long clips are, and the sample-rate mix the decoder has to cope with."""
    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    d = stats.durations
    top = max(CLIP_SECONDS, float(d.max()) if d.size else CLIP_SECONDS)
    ax1.hist(d, bins=np.linspace(0, top, 33), color=PALETTE[0])
    ax1.axvline(CLIP_SECONDS, color=PALETTE[3], linestyle="--", linewidth=1)
    ax1.set_xlabel("duration (s)")
    ax1.set_ylabel("clips")
    ax1.set_title("Clip durations")
    rates = Counter(stats.sample_rates.tolist())
    keys = sorted(rates)
    ax2.barh([_hz(k) for k in keys], [rates[k] for k in keys], color=PALETTE[1])
    ax2.set_xlabel("clips")
    ax2.set_title("Sample rates")
    ax2.tick_params(axis="y", labelsize=8)
    fig.tight_layout()

    if not d.size:
        return fig, "No readable clips."
    short = float(np.mean(d < CLIP_SECONDS - 1e-3))
    common, n_common = rates.most_common(1)[0]
    target = FeatureConfig().sample_rate
    resampled = float(np.mean(stats.sample_rates != target))
    stereo = int(np.sum(stats.channels > 1))
    text = (f"Median duration {np.median(d):.2f} s (shortest {d.min():.2f} s); "
            f"{100 * short:.0f}% of clips are shorter than {CLIP_SECONDS:g} s and are repeated "
            f"to fill the model's {CLIP_SECONDS:g}-s window. "
            + (f"All clips are at {_hz(common)}; " if len(rates) == 1 else
               f"{len(rates)} sample rates, the most common {_hz(common)} "
               f"({100 * n_common / d.size:.0f}%); ")
            + (f"{100 * resampled:.0f}% of clips are resampled to {_hz(target)}."
               if resampled else f"none needs resampling to the model's {_hz(target)}."))
    text += (f" {stereo} clip{'s are' if stereo != 1 else ' is'} stereo (mixed to mono)."
             if stereo else " All clips are mono.")
    depths = Counter(stats.subtypes)
    if len(depths) > 1:
        text += " Encodings: " + ", ".join(f"{k} {v}" for k, v in depths.most_common(4)) + "."
    return fig, text


def mean_spectrograms(stats: DatasetStats) -> tuple[Figure, str]:
    """The average log-mel image of each class, as the model's front end computes it."""
    classes = [c for c in _ordered(stats.sample_labels) if c in stats.mean_logmel]
    cols = 5
    rows = max(1, -(-len(classes) // cols))
    fig = Figure(figsize=(10, 2.1 * rows + 0.4), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()
    if classes:
        vmin = min(float(np.percentile(stats.mean_logmel[c], 5)) for c in classes)
        vmax = max(float(stats.mean_logmel[c].max()) for c in classes)
    for ax in axes:
        ax.set_axis_off()
    image = None
    for ax, c in zip(axes, classes, strict=False):
        ax.set_axis_on()
        image = ax.imshow(stats.mean_logmel[c], origin="lower", aspect="auto", cmap="magma",
                          vmin=vmin, vmax=vmax, extent=(0, CLIP_SECONDS, 0,
                                                        stats.mean_logmel[c].shape[0]))
        ax.set_title(c, fontsize=9)
        ax.tick_params(labelsize=7)
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.02, label="dB")
    fig.suptitle("Mean log-mel spectrogram per class (x: seconds, y: mel band)", fontsize=10)

    if not classes:
        return fig, "No clips could be decoded."
    centroid, steadiness = {}, {}
    for c in classes:
        img = stats.mean_logmel[c].astype(np.float64)
        power = 10 ** (img / 10)
        band = power.mean(axis=1)
        centroid[c] = float((stats.mel_hz * band).sum() / band.sum())
        steadiness[c] = float(np.std(10 * np.log10(power.mean(axis=0))))
    low, high = min(centroid, key=centroid.__getitem__), max(centroid, key=centroid.__getitem__)
    steady = sorted(steadiness, key=steadiness.__getitem__)
    n = len(stats.sample_labels)
    text = (f"From {n} decoded clips. Energy sits lowest for {low} (mean-spectrum centroid "
            f"{_hz(centroid[low])}) and highest for {high} ({_hz(centroid[high])}). "
            f"The steadiest classes over time are {', '.join(steady[:2])} (frame-to-frame "
            f"spread {steadiness[steady[0]]:.1f} dB); the most time-varying "
            f"{'are' if len(steady) > 2 else 'is'} {', '.join(steady[:-3:-1])} "
            f"({steadiness[steady[-1]]:.1f} dB): events rather than textures, so the model must "
            "find them wherever they occur in the window.")
    return fig, text


def loudness_and_centroid(stats: DatasetStats) -> tuple[Figure, str]:
    """Raw recording level and spectral centroid per class (box plots over the sample)."""
    classes = _ordered(stats.sample_labels)
    labels = np.array(stats.sample_labels)
    fig = Figure(figsize=(9, 4.2), dpi=100)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    loud = [stats.loudness_dbfs[labels == c] for c in classes]
    cent = [stats.centroid_hz[labels == c] / 1000 for c in classes]
    if classes:
        ax1.boxplot(loud, showfliers=False, **{TICK_LABELS: classes}, **HORIZONTAL)
        ax2.boxplot(cent, showfliers=False, **{TICK_LABELS: classes}, **HORIZONTAL)
    ax1.set_xlabel("RMS level (dBFS)")
    ax1.set_title("Loudness as recorded")
    ax2.set_xlabel("spectral centroid (kHz)")
    ax2.set_title("Brightness")
    ax1.tick_params(axis="y", labelsize=8)
    fig.tight_layout()

    if not classes:
        return fig, "No clips could be decoded."
    med_l = {c: float(np.median(v)) for c, v in zip(classes, loud, strict=True)}
    iqr_l = {c: float(np.subtract(*np.percentile(v, [75, 25]))) for c, v in
             zip(classes, loud, strict=True)}
    med_c = {c: float(np.median(v)) * 1000 for c, v in zip(classes, cent, strict=True)}
    loudest, quietest = max(med_l, key=med_l.__getitem__), min(med_l, key=med_l.__getitem__)
    widest = max(iqr_l, key=iqr_l.__getitem__)
    bright, dark = max(med_c, key=med_c.__getitem__), min(med_c, key=med_c.__getitem__)
    spread = med_l[loudest] - med_l[quietest]
    text = (f"Median level runs from {med_l[quietest]:.1f} dBFS ({quietest}) to "
            f"{med_l[loudest]:.1f} dBFS ({loudest}), a {spread:.0f} dB range, while within one "
            f"class ({widest}) the middle half of clips already spans {iqr_l[widest]:.0f} dB.")
    text += (" Level says as much about the recorder as about the source, which is why every "
             "clip is scaled to one RMS level before features." if iqr_l[widest] >= spread / 2
             else " Level separates some classes, but recorders vary, so the model is made "
             "gain-invariant anyway.")
    text += (f" Brightest by median spectral centroid: {bright} ({_hz(med_c[bright])}); "
             f"darkest: {dark} ({_hz(med_c[dark])}).")
    return fig, text


@dataclass(frozen=True)
class VisualSpec:
    name: str
    title: str
    make: Callable[[DatasetStats], tuple[Figure, str]]


VISUALS: tuple[VisualSpec, ...] = (
    VisualSpec("class_distribution", "Class distribution", class_distribution),
    VisualSpec("duration_rate", "Durations and sample rates", duration_and_rate),
    VisualSpec("mean_spectrograms", "Mean log-mel spectrogram per class", mean_spectrograms),
    VisualSpec("loudness_centroid", "Loudness and brightness per class", loudness_and_centroid),
)


# --------------------------------------------------------------------------- cache

@dataclass
class RenderedVisual:
    name: str
    title: str
    png: Path
    text: str


def data_signature(root: str | Path, max_per_class: int = 40) -> str:
    """Changes when any audio file is added, removed or rewritten (paths, sizes, mtimes)."""
    from .datasets import AUDIO_EXTENSIONS

    root = Path(root)
    h = hashlib.sha256(f"v{STATS_VERSION}:{max_per_class}:{root.resolve()}".encode())
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS
                       or p.name in ("manifest.csv", "UrbanSound8K.csv")):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _folder(cache_dir: Path, root: Path, max_per_class: int) -> Path:
    return Path(cache_dir) / "visualise" / data_signature(root, max_per_class)


def cached(root: str | Path, cache_dir: Path, max_per_class: int = 40
           ) -> list[RenderedVisual] | None:
    """The rendered visuals if this exact data was rendered before, else None (no work)."""
    folder = _folder(cache_dir, Path(root), max_per_class)
    index = folder / "index.json"
    if not index.is_file():
        return None
    try:
        items = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    return [RenderedVisual(i["name"], i["title"], folder / f"{i['name']}.png", i["text"])
            for i in items]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One renderer per data signature across processes (gunicorn workers, the notebook)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def render_all(root: str | Path, cache_dir: Path, max_per_class: int = 40
               ) -> list[RenderedVisual]:
    """Compute (or reuse) every visual for ``root``; PNGs + texts under ``cache_dir``."""
    root = Path(root)
    folder = _folder(cache_dir, root, max_per_class)
    with _locked(folder.parent / f".{folder.name}.lock"):
        done = cached(root, cache_dir, max_per_class)
        if done is not None:
            return done
        stats = compute_stats(root, max_per_class)
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for spec in VISUALS:
            fig, text = spec.make(stats)
            tmp = folder / f".{spec.name}.{os.getpid()}.png"
            fig.savefig(tmp, format="png")
            os.replace(tmp, folder / f"{spec.name}.png")
            items.append({"name": spec.name, "title": spec.title, "text": text})
        tmp = folder / f".index.{os.getpid()}.json"
        tmp.write_text(json.dumps(items, indent=1))
        os.replace(tmp, folder / "index.json")  # written last: its presence means complete
    return cached(root, cache_dir, max_per_class) or []
