"""A procedural stand-in for UrbanSound8K: ten classes of synthetic urban sounds.

Why it exists: the first-run demo, the notebook in CI and the fast tests need labelled audio
in the project's layout without a 6 GB download or a licence question. Each class is a small
signal model (a siren sweeps, an engine fires 20-40 times a second, a gun shot is an impulse
with a reverberant tail ...) whose parameters are drawn per clip, and every clip is buried in
background noise at a random SNR, so a model has to learn the acoustic signature and not a
fixed template.

It is never UrbanSound8K: the manifest says ``source=synthetic`` for every clip and
``SYNTHETIC.md`` says so in words. Accuracy measured on it says nothing about real audio.

Deterministic: clip ``i`` of class ``c`` in split ``s`` is drawn from its own random stream,
seeded by ``(seed, s, c, i)``, so it is the same whatever ``per_class`` is.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.fft import next_fast_len
from tqdm import tqdm

from .datasets import MANIFEST, Clip, write_manifest
from .errors import UserError
from .preprocessing import CLASSES, SAMPLE_RATE

SOURCE = "synthetic"
PREFIX = "synth-"
TRAIN_FOLDS = tuple(range(1, 10))
TEST_FOLD = 10
SNR_DB = (3.0, 20.0)  # background noise: from clearly audible to faint
PEAK_DBFS = (-24.0, -1.0)  # recording level varies between microphones

Generator = Callable[[np.random.Generator, int, int], np.ndarray]


class SynthError(UserError):
    """The output folder cannot take a synthetic set; ``message`` says why in one line."""


# --------------------------------------------------------------------------- building blocks

def _time(n: int, sr: int) -> np.ndarray:
    return np.arange(n) / sr


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float,
                tilt_db_per_oct: float = 0.0) -> np.ndarray:
    """Gaussian noise shaped in the frequency domain: one FFT instead of a filter design, and
    soft band edges so the spectrum has no artificial cliffs."""
    size = next_fast_len(max(n, 2), real=True)  # a clip length with a large prime factor
    spec = np.fft.rfft(rng.standard_normal(size))  # would make the FFT ten times slower
    f = np.fft.rfftfreq(size, 1 / sr)
    f[0] = f[1]
    order = 3.0  # steepness of the soft band edges
    gain = (f / 1000.0) ** (tilt_db_per_oct / 6.02) / ((1 + (lo / f) ** order)
                                                      * (1 + (f / hi) ** order))
    y = np.fft.irfft(spec * gain, size)[:n]
    return y / (np.std(y) + 1e-12)


def _partials(phase: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """``sum_k gains[k-1] * sin(k * phase)`` by the Chebyshev recurrence
    ``sin((k+1)x) = 2 cos(x) sin(kx) - sin((k-1)x)``: two multiply-adds per partial instead of a
    sine, which is what keeps a whole data set within seconds. ``gains`` is ``(K,)`` or
    ``(K, n)`` (time-varying, e.g. formants or anti-aliasing)."""
    two_cos = 2 * np.cos(phase)
    prev, cur = np.zeros_like(phase), np.sin(phase)
    out = gains[0] * cur
    for g in gains[1:]:
        prev, cur = cur, two_cos * cur - prev
        out += g * cur
    return np.asarray(out)


def _harmonics(freq: np.ndarray | float, n: int, sr: int, weights: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """A harmonic stack following an instantaneous-frequency track; partials above Nyquist
    are dropped sample by sample so sweeps never alias."""
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    phase = (2 * np.pi / sr) * np.cumsum(f) + rng.uniform(0, 2 * np.pi)
    k = np.arange(1, len(weights) + 1)
    if f.max() * len(weights) < 0.45 * sr:
        return _partials(phase, weights)
    audible = (k[:, None] * f[None, :]) < 0.45 * sr
    return _partials(phase, weights[:, None] * audible)


def _decay(n: int, sr: int, tau: float, attack: float = 0.002) -> np.ndarray:
    t = _time(n, sr)
    return np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-t / tau)


def _gate(n: int, sr: int, attack: float, release: float) -> np.ndarray:
    """A flat envelope with short linear ramps: removes the clicks a hard cut would add."""
    t = _time(n, sr)
    return np.clip(np.minimum(t / attack, (n / sr - t) / release), 0.0, 1.0)


def _add(out: np.ndarray, event: np.ndarray, start: int) -> None:
    end = min(len(out), start + len(event))
    if start < end:
        out[start:end] += event[: end - start]


def _since_last(rate: np.ndarray | float, n: int, sr: int, rng: np.random.Generator
                ) -> np.ndarray:
    """Seconds since the last event of a (possibly varying) periodic train: lets pulse trains
    (engines, jackhammers) be built without a Python loop over events."""
    r = np.broadcast_to(np.asarray(rate, dtype=np.float64), (n,))
    cycles = np.cumsum(r) / sr + rng.uniform(0, 1)
    return (cycles % 1.0) / r


# --------------------------------------------------------------------------- the ten classes

def air_conditioner(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Steady broadband fan noise plus mains/compressor hum harmonics."""
    t = _time(n, sr)
    noise = _band_noise(rng, n, sr, rng.uniform(80, 400), rng.uniform(1500, 6000),
                        rng.uniform(-4, -1))
    f0 = rng.uniform(50, 130)
    hum = _harmonics(f0, n, sr, 1 / np.arange(1, 9) ** rng.uniform(0.7, 1.6), rng)
    hum /= np.std(hum) + 1e-12
    wobble = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t)
    return (noise + rng.uniform(0.3, 1.0) * hum) * wobble


def car_horn(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """One to three blasts of a two-tone horn (about a major third apart), brassy harmonics."""
    f1 = rng.uniform(300, 520)
    f2 = f1 * rng.choice([1.19, 1.25, 1.26, 1.33])
    weights = 1 / np.arange(1, 13) ** rng.uniform(0.5, 1.1)
    out = np.zeros(n)
    for _ in range(rng.integers(1, 4)):
        m = int(min(n, rng.uniform(0.25, 1.4) * sr))
        drift = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 7) * _time(m, sr))
        blast = _harmonics(f1 * drift, m, sr, weights, rng) + _harmonics(f2 * drift, m, sr,
                                                                         weights, rng)
        _add(out, blast * _gate(m, sr, 0.01, 0.03), int(rng.integers(0, max(1, n - m // 2))))
    return out


def children_playing(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Several high voices: chirping pitch contours through moving formants, in syllables.

    Formant gains change slowly, so they are computed every 32 samples and held: the costly
    part of a voice drops thirty-fold and the result is inaudibly different.
    """
    t = _time(n, sr)
    hold = 32
    tc = t[::hold]
    k = np.arange(1, 13)[:, None]
    out = _band_noise(rng, n, sr, 300, 4000) * rng.uniform(0.1, 0.3)
    for _ in range(rng.integers(2, 6)):
        n_knots = max(2, int(n / sr / rng.uniform(0.12, 0.3)) + 2)
        knots = np.linspace(0, n / sr, n_knots)
        pitch = rng.uniform(220, 450) * rng.uniform(0.7, 1.4, n_knots)
        partial = k * np.interp(tc, knots, pitch)[None, :]
        f1 = np.interp(tc, knots, rng.uniform(500, 1000, n_knots))
        f2 = np.interp(tc, knots, rng.uniform(1300, 2800, n_knots))
        gains = (np.exp(-0.5 * ((partial - f1) / 150) ** 2)
                 + 0.7 * np.exp(-0.5 * ((partial - f2) / 250) ** 2)) / k
        gains *= partial < 0.45 * sr
        gains = np.repeat(gains, hold, axis=1)[:, :n]
        phase = (2 * np.pi / sr) * np.cumsum(np.interp(t, knots, pitch))
        voice = _partials(phase, gains)
        syllables = np.clip(np.sin(2 * np.pi * rng.uniform(2.5, 6) * t + rng.uniform(0, 6)),
                            0, None) ** 0.7
        out += voice / (np.std(voice) + 1e-12) * syllables * rng.uniform(0.4, 1.0)
    return out


def dog_bark(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Short noisy harmonic bursts that glide down and die fast, repeated with gaps."""
    out = np.zeros(n)
    pos = int(rng.uniform(0, 0.3) * sr)
    f0 = rng.uniform(350, 900)
    for _ in range(rng.integers(1, 6)):
        m = int(rng.uniform(0.08, 0.25) * sr)
        glide = np.linspace(1.0, rng.uniform(0.6, 0.9), m) * f0 * rng.uniform(0.9, 1.1)
        tone = _harmonics(glide, m, sr, 1 / np.arange(1, 11) ** 0.8, rng)
        tone /= np.std(tone) + 1e-12
        rasp = _band_noise(rng, m, sr, 500, 3500) * rng.uniform(0.2, 0.7)
        _add(out, (tone + rasp) * _decay(m, sr, rng.uniform(0.03, 0.08), 0.005), pos)
        pos += m + int(rng.uniform(0.1, 0.6) * sr)
        if pos >= n:
            break
    return out


def drilling(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """A high motor whine, amplitude-modulated by the bit's rotation, over grinding noise."""
    t = _time(n, sr)
    f = rng.uniform(1200, 4000) * (1 + 0.005 * np.cumsum(rng.standard_normal(n)) / np.sqrt(n))
    whine = _harmonics(f, n, sr, np.array([1.0, 0.5, 0.3, 0.15]), rng)
    whine /= np.std(whine) + 1e-12
    am = 1 + rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * rng.uniform(15, 60) * t)
    grind = _band_noise(rng, n, sr, f[0] * 0.5, min(f[0] * 2.5, 0.45 * sr))
    return (whine + rng.uniform(0.3, 0.8) * grind) * am


def engine_idling(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Cylinder firings at 20-40 Hz, each ringing a low body resonance, plus low rumble."""
    t = _time(n, sr)
    rate = rng.uniform(20, 40) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(0.3, 2) * t))
    since = _since_last(rate, n, sr, rng)
    f_res = rng.uniform(60, 220)
    pulses = np.exp(-since / rng.uniform(0.006, 0.02)) * np.sin(2 * np.pi * f_res * since)
    pulses /= np.std(pulses) + 1e-12
    rumble = _band_noise(rng, n, sr, 20, rng.uniform(250, 600))
    return pulses + rng.uniform(0.2, 0.6) * rumble


def gun_shot(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """A muzzle blast (broadband impulse and low thump) followed by a reverberant tail."""
    out = np.zeros(n)
    pos = int(rng.uniform(0, 0.2) * sr)
    for _ in range(1 if rng.random() < 0.7 else rng.integers(2, 4)):
        m = min(n, int(rng.uniform(0.4, 1.2) * sr))
        blast = _band_noise(rng, m, sr, 100, 9000) * _decay(m, sr, rng.uniform(0.004, 0.02),
                                                            0.0005)
        thump = np.sin(2 * np.pi * rng.uniform(50, 150) * _time(m, sr)) * _decay(m, sr, 0.05)
        tail = _band_noise(rng, m, sr, 150, rng.uniform(2000, 5000)) * _decay(
            m, sr, rng.uniform(0.08, 0.4), 0.01) * rng.uniform(0.05, 0.2)
        _add(out, blast + 0.7 * thump + tail, pos)
        pos += int(rng.uniform(0.2, 0.8) * sr)
        if pos >= n:
            break
    return out


def jackhammer(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Broadband hits at 10-20 Hz with a metallic ring, in runs separated by short pauses."""
    t = _time(n, sr)
    since = _since_last(rng.uniform(10, 20), n, sr, rng)
    hits = _band_noise(rng, n, sr, 200, 8000) * np.exp(-since / rng.uniform(0.006, 0.02))
    ring_f = rng.uniform(1000, 4000) * np.array([1.0, 1.52, 2.33])
    ring = (np.sin(2 * np.pi * ring_f[:, None] * t[None, :]).sum(0)
            * np.exp(-since / 0.03) * rng.uniform(0.1, 0.4))
    runs = np.ones(n)
    pos = int(rng.uniform(0.5, 2.0) * sr)
    while pos < n:
        gap = int(rng.uniform(0.1, 0.5) * sr)
        runs[pos : pos + gap] = 0.05
        pos += gap + int(rng.uniform(0.5, 2.0) * sr)
    return np.asarray((hits + ring) * runs)


def siren(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """An emergency siren: a slow wail, a fast yelp or a two-tone hi-lo, square-ish timbre."""
    t = _time(n, sr)
    lo, hi = rng.uniform(450, 800), rng.uniform(1100, 1800)
    mode = rng.choice(["wail", "yelp", "hilo"], p=[0.45, 0.35, 0.2])
    if mode == "hilo":
        f = np.where((t / rng.uniform(0.4, 0.7) + rng.uniform(0, 1)) % 1 < 0.5, lo, hi * 0.9)
    else:
        period = rng.uniform(2.0, 5.0) if mode == "wail" else rng.uniform(0.15, 0.4)
        f = lo + (hi - lo) * (0.5 - 0.5 * np.cos(2 * np.pi * t / period + rng.uniform(0, 6)))
    brightness = rng.uniform(0.3, 1.0) ** np.arange(7)
    odd = np.array([1.0, 0.0, 1 / 3, 0.0, 1 / 5, 0.0, 1 / 7]) * brightness
    doppler = 1 + rng.uniform(-0.02, 0.02) * t / max(t[-1], 1e-3)
    return _harmonics(f * doppler, n, sr, odd, rng)


def street_music(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """A pentatonic melody of plucked harmonic notes over a kick and hi-hat beat."""
    beat = 60 / rng.uniform(80, 140)
    root = 440 * 2 ** ((rng.integers(-14, 0)) / 12)
    scale = root * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12)
    weights = 1 / np.arange(1, 9) ** rng.uniform(0.8, 1.6)
    out = np.zeros(n)
    pos, step = 0, beat * rng.choice([0.5, 1.0])
    while pos < n:
        m = int(rng.uniform(1.0, 2.0) * step * sr)
        note = _harmonics(rng.choice(scale), m, sr, weights, rng)
        _add(out, note * _decay(m, sr, rng.uniform(0.1, 0.4), 0.01), pos)
        pos += int(step * sr * (1 if rng.random() < 0.8 else 2))
    drums = np.zeros(n)
    kick_n = int(0.2 * sr)
    kt = _time(kick_n, sr)
    kick = np.sin(2 * np.pi * np.cumsum(60 + 90 * np.exp(-kt / 0.03)) / sr) * _decay(kick_n, sr,
                                                                                     0.08)
    hat_n = int(0.05 * sr)
    for b in np.arange(0, n / sr, beat):
        _add(drums, 1.5 * kick, int(b * sr))
        _add(drums, _band_noise(rng, hat_n, sr, 6000, 10000) * _decay(hat_n, sr, 0.015) * 0.3,
             int((b + beat / 2) * sr))
    return out / (np.std(out) + 1e-12) + rng.uniform(0.3, 1.0) * drums


GENERATORS: dict[str, Generator] = {
    "air_conditioner": air_conditioner,
    "car_horn": car_horn,
    "children_playing": children_playing,
    "dog_bark": dog_bark,
    "drilling": drilling,
    "engine_idling": engine_idling,
    "gun_shot": gun_shot,
    "jackhammer": jackhammer,
    "siren": siren,
    "street_music": street_music,
}
# Event classes are short in UrbanSound8K too; steady sources fill most of the 4-s slice.
DURATIONS: dict[str, tuple[float, float]] = {
    "air_conditioner": (2.0, 4.0), "car_horn": (0.5, 3.0), "children_playing": (2.0, 4.0),
    "dog_bark": (0.5, 3.0), "drilling": (1.0, 4.0), "engine_idling": (2.0, 4.0),
    "gun_shot": (0.5, 2.5), "jackhammer": (1.5, 4.0), "siren": (2.0, 4.0),
    "street_music": (2.0, 4.0),
}
assert tuple(GENERATORS) == CLASSES and tuple(DURATIONS) == CLASSES


# --------------------------------------------------------------------------- one clip

def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """City-like ambience shared by every class, so it carries no label information."""
    return _band_noise(rng, n, sr, rng.uniform(20, 80), rng.uniform(3000, 9000),
                       rng.uniform(-6, -2))


def synth_clip(label: str, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE
               ) -> np.ndarray:
    """One float32 clip of ``label``: the source at a random length, background noise at a random
    SNR, a random peak level; never clipped."""
    lo, hi = DURATIONS[label]
    n = round(rng.uniform(lo, hi) * sample_rate)
    y = GENERATORS[label](rng, n, sample_rate)
    y = y / (np.sqrt(np.mean(y**2)) + 1e-12)
    snr = rng.uniform(*SNR_DB)
    y = y + _background(rng, n, sample_rate) * 10 ** (-snr / 20)
    fade = int(0.005 * sample_rate)
    ramp = np.linspace(0.0, 1.0, fade)
    y[:fade] *= ramp
    y[-fade:] *= ramp[::-1]
    peak = 10 ** (rng.uniform(*PEAK_DBFS) / 20)
    return np.asarray(y * peak / (np.abs(y).max() + 1e-12), dtype=np.float32)


def clip_rng(seed: int, split: str, label: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ("train", "test").index(split), CLASSES.index(label),
                                  index])


# --------------------------------------------------------------------------- the data set

def clip_name(label: str, split: str, index: int) -> str:
    """Train and test names differ so that the file stem (the clip's recording group) is
    unique across the whole set."""
    return f"{PREFIX}{label}-{index}.wav" if split == "train" else \
        f"{PREFIX}{label}-test-{index}.wav"


def _refuse_foreign(out_dir: Path) -> None:
    """Synthetic clips must never be mixed into a real data set (or it could be reported as
    one); anything in the way that we did not generate stops us."""
    foreign = [p for split in ("train", "test") if (out_dir / split).is_dir()
               for p in sorted((out_dir / split).rglob("*")) if p.is_file()
               and p.name != MANIFEST and not (p.name.startswith(PREFIX) and p.suffix == ".wav")]
    if foreign:
        raise SynthError(
            f"{out_dir} already holds {len(foreign)} file(s) that are not synthetic "
            f"(e.g. {foreign[0].relative_to(out_dir)}); the synthetic set is kept apart from "
            "real data: choose another output folder."
        )


def _clear_previous(out_dir: Path) -> None:
    """Regenerating replaces the whole set; stale clips of a larger earlier run must go."""
    for split in ("train", "test"):
        if (out_dir / split).is_dir():
            shutil.rmtree(out_dir / split)


def _write_readme(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "SYNTHETIC.md").write_text(
        "# Synthetic data set — NOT UrbanSound8K\n\n"
        "Every clip in this folder was generated procedurally by `src/synth.py` "
        "(`urbansound data synth`). None is a recording; none comes from UrbanSound8K.\n"
        "It exists for the offline demo and fast tests. Accuracy measured on it says nothing\n"
        "about real urban sound: use UrbanSound8K (`urbansound data download`) for that.\n\n"
        f"- seed: {summary['seed']}\n"
        f"- sample rate: {summary['sample_rate']} Hz, mono, 16-bit PCM WAV\n"
        f"- train: {summary['train']} clips ({summary['per_class']} per class, folds 1-9)\n"
        f"- test: {summary['test']} clips ({summary['test_per_class']} per class, fold 10)\n"
        f"- classes: {', '.join(CLASSES)}\n"
        "- manifest.csv in train/ and test/ marks every clip `source=synthetic`\n",
        encoding="utf-8",
    )


def _write_wav(path: Path, y: np.ndarray, sample_rate: int) -> None:
    """Encode in memory, then write: libsndfile fsyncs on close, which would cost more than
    synthesising the clip, and a demo set can always be regenerated."""
    buf = io.BytesIO()
    sf.write(buf, y, sample_rate, format="WAV", subtype="PCM_16")
    path.write_bytes(buf.getvalue())


def _write_split(out_dir: Path, split: str, count: int, seed: int, sample_rate: int,
                 bar: tqdm[Any]) -> tuple[list[Clip], float]:
    root = out_dir / split
    clips, seconds = [], 0.0
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            y = synth_clip(label, clip_rng(seed, split, label, i), sample_rate)
            path = root / label / clip_name(label, split, i)
            _write_wav(path, y, sample_rate)
            fold = TRAIN_FOLDS[i % len(TRAIN_FOLDS)] if split == "train" else TEST_FOLD
            clips.append(Clip(path, label, fold, path.stem, SOURCE))
            seconds += len(y) / sample_rate
            bar.update()
    write_manifest(root, clips)
    return clips, seconds


def generate(out_dir: Path, per_class: int = 20, test_per_class: int = 6, seed: int = 0,
             sample_rate: int = SAMPLE_RATE, progress: bool = True) -> dict[str, Any]:
    """Write a synthetic train/test set in the class-per-folder layout; return a summary.

    Refuses a folder that holds anything but an earlier synthetic set, and replaces that one.
    """
    if per_class < 1 or test_per_class < 0:
        raise SynthError("per_class must be >= 1 and test_per_class >= 0.")
    if not 8000 <= sample_rate <= 192_000:
        raise SynthError(f"sample rate {sample_rate} Hz is outside 8000-192000 Hz.")
    out_dir = Path(out_dir)
    _refuse_foreign(out_dir)
    _clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = len(CLASSES) * (per_class + test_per_class)
    with tqdm(total=total, desc="synthesising clips", unit="clip", disable=not progress,
              leave=False) as bar:
        train, s_train = _write_split(out_dir, "train", per_class, seed, sample_rate, bar)
        test, s_test = _write_split(out_dir, "test", test_per_class, seed, sample_rate, bar)
    summary = {
        "out_dir": str(out_dir), "source": SOURCE, "seed": seed, "sample_rate": sample_rate,
        "per_class": per_class, "test_per_class": test_per_class,
        "train": len(train), "test": len(test), "classes": list(CLASSES),
        "seconds": round(s_train + s_test, 2),
    }
    _write_readme(out_dir, summary)
    return summary
