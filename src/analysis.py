"""Long recordings, window by window: decode in blocks, resample as a stream, cut overlapping
windows, classify them in batches with the served model, and merge the answers into a timeline
of labelled events.

Why it is built this way:

* **Bounded memory.** The file is decoded ``block_s`` at a time (libsndfile reads any length
  in pieces) and resampled by ``soxr``'s streaming resampler, so only the samples the next
  windows still need are held: a 10-minute 48 kHz stereo file costs what a few seconds do.
* **One code path with predict.** Every window becomes exactly what ``load_clip`` makes of a
  clip (mono, resampled, ``normalise_level``, ``fix_length`` from ``preprocessing``) and goes
  through ``Predictor.probabilities`` and ``Predictor.from_probabilities``: a window's label
  and probabilities are what ``predict`` answers for the same stretch cut out as a file. The
  sample rate, clip length and level all come from the checkpoint's feature config.
* **Batches.** Windows go through the model ``batch_size`` at a time (the traced, frozen
  model of ``Predictor``): one batched call costs far less than as many single ones.
* **A timeline, not just windows.** Windows overlap (hop < window), so each stretch between
  two window edges is judged by the mean probabilities of every window that heard all of it;
  below ``min_confidence`` it is ``uncertain``, and a window quieter than ``silence_dbfs`` is
  ``silence`` (the model is not asked: predict refuses silent clips, and level normalisation
  would turn a silent stretch into loud noise). Runs of one class are the events.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr

from .preprocessing import (
    AudioError,
    AudioSource,
    FeatureConfig,
    _open,
    fix_length,
    normalise_level,
    to_mono,
)

if TYPE_CHECKING:
    from .prediction import Predictor

SILENCE = "silence"
UNCERTAIN = "uncertain"
#: Seconds decoded per read: large enough that libsndfile and soxr run at full speed, small
#: enough that a block of 8-channel 192 kHz float audio is still only ~50 MB.
BLOCK_S = 8.0
#: Level envelope points kept for display (a waveform strip), however long the recording.
ENVELOPE_POINTS = 1200
ProgressCallback = Callable[[float, float], None]  # (seconds done, seconds expected)


class AnalysisError(AudioError):
    """Settings that cannot describe a window (hop longer than the window, a window longer
    than the model hears...)."""

    def __init__(self, message: str):
        super().__init__("bad_window", message)


@dataclass(frozen=True)
class Options:
    """How to cut and judge a recording; the defaults are the ``URBANSOUND_ANALYZE_*``
    settings (``from_settings``)."""

    window_s: float = 4.0
    hop_s: float = 2.0
    min_confidence: float = 0.5
    silence_dbfs: float = -80.0
    batch_size: int = 16
    max_seconds: float = 24 * 3600.0
    min_seconds: float = 0.05

    @classmethod
    def from_settings(cls, window_s: float | None = None, hop_s: float | None = None,
                      config: FeatureConfig | None = None,
                      min_confidence: float | None = None) -> Options:
        """The settings' options with these window, hop and threshold. Left unset, window
        and hop default to the settings' values capped to what ``config``'s model hears (a
        model of 2-s clips gets 2-s windows); set explicitly, ``check`` judges them."""
        from .settings import get_settings

        s = get_settings()
        clip = config.clip_seconds if config is not None else math.inf
        window = min(s.analyze_window_s, clip) if window_s is None else window_s
        return cls(window_s=window, hop_s=min(s.analyze_hop_s, window) if hop_s is None
                   else hop_s,
                   min_confidence=s.analyze_min_confidence if min_confidence is None
                   else min_confidence,
                   silence_dbfs=s.analyze_silence_dbfs, batch_size=s.analyze_batch_size,
                   max_seconds=s.analyze_max_seconds, min_seconds=s.min_clip_seconds)

    def check(self, config: FeatureConfig) -> None:
        """Refuse windows the model cannot judge: it was trained on ``clip_seconds`` clips
        (a longer window would be cut, half of it never heard)."""
        if not 0.5 <= self.window_s <= config.clip_seconds + 1e-9:
            raise AnalysisError(f"The window must last 0.5 to {config.clip_seconds:g} s (what "
                                f"the model hears), not {self.window_s:g} s.")
        if not 0.25 <= self.hop_s <= self.window_s + 1e-9:
            raise AnalysisError(f"The hop must be 0.25 s to the window ({self.window_s:g} s), "
                                f"not {self.hop_s:g} s: windows may overlap, never leave gaps.")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise AnalysisError(f"The confidence threshold must be 0 to 1, not "
                                f"{self.min_confidence:g}.")
        if self.batch_size < 1:
            raise AnalysisError("The batch size must be at least 1.")


@dataclass
class Window:
    start_s: float
    end_s: float
    label: str  # the model's top class, or "silence" (the model was not asked)
    confidence: float  # the top class's probability (1.0 for silence: a measured fact)
    probabilities: dict[str, float] | None  # None for silence
    level_dbfs: float

    def to_dict(self) -> dict[str, Any]:
        return {"start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
                "label": self.label, "confidence": self.confidence,
                "probabilities": self.probabilities, "level_dbfs": round(self.level_dbfs, 1)}


@dataclass
class Event:
    label: str
    start_s: float
    end_s: float
    confidence: float  # mean probability of ``label`` over the event (time-weighted)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "start_s": round(self.start_s, 3),
                "end_s": round(self.end_s, 3), "confidence": round(self.confidence, 4)}


@dataclass
class Analysis:
    """The answer for one recording; ``to_dict`` is the CLI's and the API's JSON object."""

    duration_s: float
    sample_rate: int
    channels: int
    model_version: str
    options: Options
    windows: list[Window]
    events: list[Event]
    summary: dict[str, float]  # every class, "uncertain" and "silence" → seconds
    warnings: list[str] = field(default_factory=list)
    header_duration_s: float | None = None
    envelope_step_s: float = 0.0
    envelope_dbfs: list[float] = field(default_factory=list)  # level over time, for display
    file: str | None = None

    def to_dict(self, envelope: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "duration_s": round(self.duration_s, 3),
            "analysed_s": round(self.duration_s, 3),
            "header_duration_s": None if self.header_duration_s is None
            else round(self.header_duration_s, 3),
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "model_version": self.model_version,
            "window_s": self.options.window_s,
            "hop_s": self.options.hop_s,
            "min_confidence": self.options.min_confidence,
            "windows": [w.to_dict() for w in self.windows],
            "events": [e.to_dict() for e in self.events],
            "summary": {k: round(v, 3) for k, v in self.summary.items()},
            "warnings": list(self.warnings),
        }
        if envelope:
            out["envelope"] = {"step_s": self.envelope_step_s,
                               "dbfs": [round(v, 1) for v in self.envelope_dbfs]}
        return out


# --------------------------------------------------------------------------- decoding


@dataclass
class _Stream:
    """Mono blocks at the model's rate, and what the header claimed."""

    blocks: Iterator[np.ndarray]
    sample_rate: int
    channels: int
    header_frames: int
    notes: list[str]


def stream_mono(source: AudioSource, sample_rate: int, block_s: float = BLOCK_S,
                max_seconds: float | None = None) -> _Stream:
    """Open ``source`` (``preprocessing``'s decoder and its errors) and yield mono float32
    blocks resampled to ``sample_rate``. A body that ends early or turns corrupt ends the
    stream with a note (what was read is kept); non-finite samples become 0 with a note."""
    f = _open(source)
    if f.samplerate < 1000 or f.samplerate > 384_000:
        f.close()
        raise AudioError("bad_rate", f"Unsupported sample rate {f.samplerate} Hz.")
    if f.channels < 1 or f.channels > 32:
        f.close()
        raise AudioError("bad_channels", f"Unsupported channel count {f.channels}.")
    notes: list[str] = []
    sr_in = f.samplerate

    def blocks() -> Iterator[np.ndarray]:
        resampler = None if sr_in == sample_rate else soxr.ResampleStream(
            sr_in, sample_rate, 1, dtype="float32", quality="HQ")
        limit = math.inf if max_seconds is None else max_seconds * sr_in
        read = 0
        with f:
            while True:
                want = int(min(block_s * sr_in, limit - read))
                block = np.zeros((0, 1), np.float32)
                if want > 0:
                    block, error = _read_block(f, want)
                    if error is not None:  # a truncated or corrupt body: keep what decoded
                        notes.append(f"The audio data ends or turns corrupt after "
                                     f"{(read + len(block)) / sr_in:.1f} s ({error}); "
                                     "analysed what came before.")
                        want = len(block) + 1  # this is the last block
                elif read >= limit:
                    notes.append(f"Only the first {max_seconds:g} s were analysed "
                                 "(URBANSOUND_ANALYZE_MAX_SECONDS).")
                read += len(block)
                last = len(block) < want or want <= 0
                y = downmix(block)
                if not np.isfinite(y).all():
                    bad = int((~np.isfinite(y)).sum())
                    notes.append(f"{bad} non-finite samples near {read / sr_in:.1f} s were "
                                 "replaced by silence.")
                    y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
                if resampler is not None:
                    y = resampler.resample_chunk(y, last=last)
                if y.size:
                    yield y
                if last:
                    return

    return _Stream(blocks(), sr_in, f.channels, f.frames, notes)


def downmix(block: np.ndarray) -> np.ndarray:
    """``preprocessing.to_mono``, bit for bit, without BLAS for stereo: ``(L + R) * 0.5``
    rounds exactly as ``0.5 L + 0.5 R`` does (halving is exact in binary floating point), but
    a plain add never wakes BLAS threads, which on a busy machine spin for longer than the
    sum takes (0.8 s of a 10-minute file's 2.6 s, measured under load)."""
    if block.ndim == 2 and block.shape[1] == 2:
        out: np.ndarray = np.add(block[:, 0], block[:, 1], dtype=np.float32)
        out *= np.float32(0.5)
        return out
    return to_mono(block)


def _read_block(f: Any, frames: int) -> tuple[np.ndarray, str | None]:
    """Up to ``frames`` frames, and why reading stopped early if it failed. libsndfile
    raises when a body is cut short (a truncated FLAC whose header promises more), after
    decoding what it could into the buffer: ``tell`` says how much that was."""
    out = np.empty((frames, f.channels), np.float32)  # fresh: blocks may be kept as views
    start = f.tell()
    try:
        n = len(f.read(out=out))
        return out[:n], None
    except Exception as exc:  # a corrupt body fails in many ways
        try:
            got = max(0, min(frames, f.tell() - start))
        except Exception:
            got = 0
        return out[:got], " ".join(str(exc).split())[:120] or type(exc).__name__


def prefetched(blocks: Iterator[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
    """Decode the next blocks in a thread while the model works on this one: libsndfile
    (through cffi), soxr and numpy release the GIL, so with two cores the decoding hides
    behind the model. At most ``depth`` blocks wait, so memory stays bounded; an error in the
    decoder is raised here, in order."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not put(block):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()  # the decoder's file is closed by the thread that read it

    worker = threading.Thread(target=produce, name="analysis-decode", daemon=True)
    worker.start()
    try:
        while (item := handoff.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


# --------------------------------------------------------------------------- windows


def _level_dbfs(y: np.ndarray) -> float:
    rms = math.sqrt(float(np.mean(np.square(y, dtype=np.float64)))) if y.size else 0.0
    return 20 * math.log10(max(rms, 1e-10))


class _Windower:
    """Cuts windows out of a stream of blocks, keeping only the samples still needed."""

    def __init__(self, win: int, hop: int):
        self.win, self.hop = win, hop
        self.buffer = np.zeros(0, np.float32)
        self.buffer_start = 0  # stream index of buffer[0]
        self.total = 0  # samples seen
        self.next_start = 0
        self.emitted_end = 0

    def feed(self, y: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        self.buffer = np.concatenate([self.buffer, y]) if self.buffer.size else y
        self.total += y.size
        while self.next_start + self.win <= self.total:
            i = self.next_start - self.buffer_start
            yield self.next_start, self.buffer[i : i + self.win]
            self.emitted_end = self.next_start + self.win
            self.next_start += self.hop
        # keep what the next window needs, and the last `win` samples (a possible tail window)
        keep_from = min(self.next_start, max(0, self.total - self.win))
        if keep_from > self.buffer_start:
            self.buffer = self.buffer[keep_from - self.buffer_start :].copy()
            self.buffer_start = keep_from

    def tail(self) -> tuple[int, np.ndarray] | None:
        """The end-aligned last window when the grid left the end unheard; for a recording
        shorter than one window, the whole of it (padded later as predict pads a short clip)."""
        if self.total == 0 or self.emitted_end >= self.total:
            return None
        start = max(0, self.total - self.win)
        return start, self.buffer[start - self.buffer_start :]


# --------------------------------------------------------------------------- analysis


def analyse(source: AudioSource, predictor: Predictor, options: Options | None = None,
            on_progress: ProgressCallback | None = None, name: str | None = None) -> Analysis:
    """Analyse a recording of any length; raises ``AudioError`` when nothing usable could be
    read (undecodable, empty, shorter than ``min_seconds``) or the options are invalid."""
    opts = options or Options()
    config = predictor.config
    opts.check(config)
    sr = config.sample_rate
    win, hop = round(opts.window_s * sr), round(opts.hop_s * sr)
    stream = stream_mono(source, sr, max_seconds=opts.max_seconds)
    header_s = stream.header_frames / stream.sample_rate if stream.header_frames > 0 else None
    expected = header_s or 0.0

    windower = _Windower(win, hop)
    starts: list[int] = []
    levels: list[float] = []
    probs: list[np.ndarray] = []  # one row per window; NaN rows for silence
    pending: list[np.ndarray] = []
    pending_rows: list[int] = []
    envelope = _Envelope(sr, expected)
    n_classes = len(predictor.classes)

    def add(start: int, y: np.ndarray) -> None:
        level = _level_dbfs(y)
        starts.append(start)
        levels.append(level)
        probs.append(np.full(n_classes, np.nan, np.float32))
        if level >= opts.silence_dbfs:
            pending.append(fix_length(normalise_level(y, config.target_dbfs), config.n_samples,
                                      config.pad_mode))
            pending_rows.append(len(probs) - 1)

    def flush() -> None:
        if pending:
            out = predictor.probabilities(np.stack(pending))
            for row, p in zip(pending_rows, out, strict=True):
                probs[row] = p
            pending.clear()
            pending_rows.clear()

    for block in prefetched(stream.blocks):
        envelope.feed(block)
        for start, y in windower.feed(block):
            add(start, y)
            if len(pending) >= opts.batch_size:
                flush()
        if on_progress is not None:
            on_progress(windower.total / sr, max(expected, windower.total / sr))
    total = windower.total
    if total / sr < opts.min_seconds:
        if total == 0:
            raise AudioError("empty", "The file contains no audio samples.")
        raise AudioError("too_short", f"The recording lasts {1000 * total / sr:.0f} ms; at "
                         f"least {1000 * opts.min_seconds:.0f} ms is needed.")
    tail = windower.tail()
    if tail is not None:
        add(*tail)
    flush()

    duration = total / sr
    warnings = list(stream.notes)
    capped = duration >= opts.max_seconds - 1 / sr
    if header_s is not None and header_s - duration > 0.1 and not capped:
        warnings.append(f"The file's header claims {header_s:.1f} s, but only {duration:.1f} s "
                        "of audio could be read: the file is truncated. Analysed what is there.")
    if duration < opts.window_s:
        warnings.append(f"The recording ({duration:.2f} s) is shorter than one window "
                        f"({opts.window_s:g} s): it was repeated to fill the window, as predict "
                        "does with a short clip.")
    ends = [min(s + win, total) for s in starts]
    windows = [_window(predictor, s / sr, e / sr, lv, p)
               for s, e, lv, p in zip(starts, ends, levels, probs, strict=True)]
    labels, seg_probs, edges = _timeline(np.array(starts), np.array(ends), np.stack(probs),
                                         opts.min_confidence, predictor.classes)
    edges_s = edges / sr
    summary = dict.fromkeys((*predictor.classes, UNCERTAIN, SILENCE), 0.0)
    for label, a, b in zip(labels, edges_s[:-1], edges_s[1:], strict=True):
        summary[label] += float(b - a)
    if summary[SILENCE] >= duration - 1e-6:
        warnings.append(f"The recording is silent (no window above {opts.silence_dbfs:g} dBFS):"
                        " there is nothing to classify.")
    return Analysis(
        duration_s=duration, sample_rate=stream.sample_rate, channels=stream.channels,
        model_version=predictor.version, options=opts, windows=windows,
        events=_events(labels, seg_probs, edges_s, predictor.classes), summary=summary,
        warnings=warnings, header_duration_s=header_s, envelope_step_s=envelope.step_s,
        envelope_dbfs=envelope.finish(), file=name)


def _window(predictor: Predictor, start_s: float, end_s: float, level: float,
            p: np.ndarray) -> Window:
    if np.isnan(p).any():
        return Window(start_s, end_s, SILENCE, 1.0, None, level)
    best = predictor.from_probabilities(p, top_k=1)  # predict's own reading of the numbers
    return Window(start_s, end_s, best.label, best.confidence, best.probabilities, level)


def _timeline(starts: np.ndarray, ends: np.ndarray, probs: np.ndarray, min_confidence: float,
              classes: tuple[str, ...]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Cut the time line at every window edge; each piece gets the mean probabilities of the
    windows that cover it whole. A piece any silent window covers is silence.

    Windows all have one length and rising starts, so the windows covering a piece are a
    contiguous run of indices, found with two ``searchsorted``; prefix sums give the means."""
    edges = np.unique(np.concatenate([starts, ends]))
    a, b = edges[:-1], edges[1:]
    lo = np.searchsorted(ends, b, side="left")  # first window ending at or after the piece
    hi = np.searchsorted(starts, a, side="right")  # one past the last starting at or before
    silent = np.isnan(probs).any(axis=1)
    csum = np.vstack([np.zeros((1, probs.shape[1])), np.cumsum(np.nan_to_num(probs), axis=0)])
    cnt = np.concatenate([[0], np.cumsum(~silent)])
    csil = np.concatenate([[0], np.cumsum(silent)])
    n = np.maximum(cnt[hi] - cnt[lo], 1)[:, None]
    means = (csum[hi] - csum[lo]) / n
    any_silent = (csil[hi] - csil[lo]) > 0
    best = means.argmax(axis=1)
    labels = [SILENCE if s else (classes[k] if m[k] >= min_confidence else UNCERTAIN)
              for s, k, m in zip(any_silent, best, means, strict=True)]
    return labels, means, edges


def _events(labels: list[str], means: np.ndarray, edges_s: np.ndarray,
            classes: tuple[str, ...]) -> list[Event]:
    """Runs of pieces with one class label; confidence = the class's time-weighted mean."""
    index = {c: i for i, c in enumerate(classes)}
    events: list[Event] = []
    i = 0
    while i < len(labels):
        j = i
        while j + 1 < len(labels) and labels[j + 1] == labels[i]:
            j += 1
        if labels[i] in index:
            span = np.diff(edges_s[i : j + 2])
            conf = float(np.average(means[i : j + 1, index[labels[i]]], weights=span))
            events.append(Event(labels[i], float(edges_s[i]), float(edges_s[j + 1]), conf))
        i = j + 1
    return events


class _Envelope:
    """RMS level (dBFS) over fixed steps, sized so a recording gives ~``ENVELOPE_POINTS``."""

    def __init__(self, sr: int, expected_s: float):
        self.step = max(int(sr * 0.05), math.ceil(expected_s * sr / ENVELOPE_POINTS))
        self.step_s = self.step / sr
        self.sums: list[float] = []
        self.rest = np.zeros(0, np.float32)

    def feed(self, y: np.ndarray) -> None:
        y = np.concatenate([self.rest, y]) if self.rest.size else y
        n = y.size // self.step
        if n:
            sq = np.square(y[: n * self.step].reshape(n, self.step), dtype=np.float64)
            self.sums.extend(sq.mean(axis=1).tolist())
        self.rest = y[n * self.step :].copy()

    def finish(self) -> list[float]:
        if self.rest.size:
            self.sums.append(float(np.mean(np.square(self.rest, dtype=np.float64))))
        return [10 * math.log10(max(v, 1e-20)) for v in self.sums]
