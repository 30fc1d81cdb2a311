"""Does waveform-rate band-envelope modulation add information beyond the spectral envelope?

    .venv/bin/python scripts/modulation_probe.py      # ~3 min on one core
    .venv/bin/python scripts/modulation_probe.py envelope envelope+finelow envelope+harmonic

Linear probes (standardised logistic regression) on recordings held out inside the training
folds of ../shared/us8k: the grouped 3-fold protocol's own folds (``crossval.grouped_folds``,
k=3, seed 0), fold 3 never read. An earlier probe on fold 3's idling engine suggested a
modulation branch beside the CNN; this one asks the same question without the test fold.
Features: the spectral envelope (each log-mel band's mean and spread, what the model's
envelope branch sees) and the modulation spectrum of 8 band envelopes at a 689 Hz frame rate
(12 log-spaced bins, 1-320 Hz: an engine's firing rate is tens of Hz, above the 43 Hz
frames of the CNN's image), each alone and together. Two more sets ask whether finer
low-frequency resolution would help (the direction "more mel bands at low frequency"): the
clip's average spectrum below 600 Hz at 2.7 Hz resolution (``finelow``) and that spectrum's
periodicity whatever its fundamental (``harmonic``). Name the sets to probe; sets join
features with '+'.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from src.crossval import grouped_folds
from src.datasets import read_us8k
from src.preprocessing import CLASSES, load_clip, mel_filterbank

US8K = Path(__file__).resolve().parents[2] / "shared" / "us8k"
SR = 22050
MACHINE = ("air_conditioner", "engine_idling", "jackhammer")
MOD_EDGES = np.geomspace(1, 320, 13)  # Hz: 12 modulation bins


def stft_power(y: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    window = np.hanning(n_fft).astype(np.float32)
    n = 1 + (len(y) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n)[:, None]
    return np.abs(np.fft.rfft(y[idx] * window, axis=1)) ** 2  # (frames, bins)


def envelope_features(y: np.ndarray) -> np.ndarray:
    """Each log-mel band's mean and spread: what the model's envelope branch sees."""
    logmel = np.log(stft_power(y, 1024, 512) @ mel_filterbank(SR, 1024, 64, 0.0, SR / 2).T
                    + 1e-8)
    return np.concatenate([logmel.mean(0), logmel.std(0)])


def modulation_features(y: np.ndarray, bands: int = 8) -> np.ndarray:
    """The shape (not the level) of each band envelope's modulation spectrum."""
    hop = 32  # 689 Hz frames
    env = np.log(stft_power(y, 256, hop) @ mel_filterbank(SR, 256, bands, 50.0, SR / 2).T
                 + 1e-8)
    env -= env.mean(0)
    power = np.abs(np.fft.rfft(env * np.hanning(len(env))[:, None], axis=0)) ** 2
    freqs = np.fft.rfftfreq(len(env), hop / SR)
    spectrum = np.log(np.array([power[(freqs >= lo) & (freqs < hi)].mean(0)
                                for lo, hi in itertools.pairwise(MOD_EDGES)]) + 1e-8)
    return (spectrum - spectrum.mean(0)).ravel()


def low_spectrum(y: np.ndarray, top_hz: float) -> tuple[np.ndarray, float]:
    """The clip's average log power spectrum from 10 Hz to ``top_hz`` at 2.7 Hz resolution
    (mean removed: its shape, not its level), and that resolution in Hz."""
    power = stft_power(y, 8192, 2048).mean(0)
    freqs = np.fft.rfftfreq(8192, 1 / SR)
    spectrum = np.log(power[(freqs >= 10) & (freqs < top_hz)] + 1e-8)
    return spectrum - spectrum.mean(), float(freqs[1])


def fine_low_features(y: np.ndarray) -> np.ndarray:
    """The shape of the clip's average spectrum below 600 Hz: mains hum and an engine's
    harmonics are tens of Hz apart, and a 64-band mel image (bands ~67 Hz wide there, 21.5 Hz
    FFT bins) blurs them into one or two bands."""
    return low_spectrum(y, 600)[0]


def harmonic_features(y: np.ndarray) -> np.ndarray:
    """How periodic that fine spectrum is, whatever its fundamental: the magnitude of the
    cepstrum of the 10-1000 Hz log spectrum at spacings of 5-100 Hz, so an engine at 800 rpm
    and one at 1,200 rpm look alike."""
    spectrum, resolution = low_spectrum(y, 1000)
    ceps = np.abs(np.fft.rfft(spectrum * np.hanning(len(spectrum))))
    spacing = len(spectrum) * resolution / np.maximum(np.arange(len(ceps)), 1)
    keep = (spacing >= 5) & (spacing <= 100)
    return np.log(ceps[keep] + 1e-8)


FEATURES = {"envelope": envelope_features, "modulation": modulation_features,
            "finelow": fine_low_features, "harmonic": harmonic_features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sets", nargs="*", default=["envelope", "modulation",
                                                    "envelope+modulation"],
                        help="feature sets to probe, each names joined by '+' "
                             f"(from {', '.join(FEATURES)})")
    args = parser.parse_args()
    clips = [c for c in read_us8k(US8K) if c.fold != 3]
    waves = [load_clip(c.path) for c in clips]
    needed = {n for s in args.sets for n in s.split("+")}
    x_of = {n: np.array([FEATURES[n](w) for w in waves]) for n in needed}
    y = np.array([CLASSES.index(c.label) for c in clips])
    machine = np.isin(y, [CLASSES.index(c) for c in MACHINE])
    folds = grouped_folds(clips, k=3, seed=0)
    for name in args.sets:
        x = np.hstack([x_of[n] for n in name.split("+")])
        for c in (0.01, 0.1):
            accs, machine_accs = [], []
            for f in folds:
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
                pred = clf.fit(x[f.train], y[f.train]).predict(x[f.test])
                right = pred == y[f.test]
                accs.append(right.mean())
                machine_accs.append(right[machine[f.test]].mean())
            print(f"{name:<20} C={c:<4} accuracy {np.mean(accs):.3f} ± "
                  f"{np.std(accs, ddof=1):.3f}  machine-noise classes "
                  f"{np.mean(machine_accs):.3f} (per fold "
                  f"{', '.join(f'{a:.3f}' for a in machine_accs)})", flush=True)


if __name__ == "__main__":
    main()
