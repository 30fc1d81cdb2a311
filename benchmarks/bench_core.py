"""ML-core benchmark: prints the figures the issue asks for, all measured in one run.

    .venv/bin/python benchmarks/bench_core.py [--us8k ../shared/us8k] [--model models/...]

1. feature extraction (decode + resample + the model's front end), clips/s, all cores, no cache;
2. one training epoch over the fold 1, 2, 4-9 clips, seconds (waveforms cached);
3. single-clip predict latency from bytes to label, one thread, median and p95, on the
   original-bytes clips (24-96 kHz WAV, so resampling is included), as served (``auto``
   precision: the conv body in bfloat16 where the CPU has native kernels), in float32, and
   untraced (the eager path a predictor takes where TorchScript tracing fails);
4. the naive stack on the same clips in the same run — librosa.load + melspectrogram + the
   reference CNN — and the speed-up ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def reference_cnn(n_classes: int = 10) -> nn.Module:
    """Four blocks of two 3x3 conv + BN + ReLU (32, 64, 128, 128), 2x2 max-pool each; GAP."""
    layers, c_in = [], 1
    for c in (32, 64, 128, 128):
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n_classes))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_features(us8k: Path, n: int) -> float:
    from src.datasets import read_us8k
    from src.features import load_waveforms
    from src.preprocessing import FeatureConfig, FrontEnd

    clips = read_us8k(us8k, {1})[:n]
    config = FeatureConfig()
    torch.set_num_threads(2)
    start = time.perf_counter()
    loaded = load_waveforms(clips, config, cache_dir=None, workers=2, progress=False)
    front = FrontEnd(config)
    with torch.inference_mode():
        for i in range(0, len(loaded.waveforms), 64):
            front(torch.from_numpy(loaded.waveforms[i : i + 64]))
    return len(clips) / (time.perf_counter() - start)


def bench_epoch(us8k: Path, cache: Path) -> tuple[float, int]:
    from src.datasets import read_us8k
    from src.model import TrainConfig, fit, new_model
    from src.preprocessing import FeatureConfig
    from src.train import Split

    clips = [c for c in read_us8k(us8k) if c.fold != 3]
    config = FeatureConfig()
    split = Split.load(clips, config, cache, progress=False)  # fills the cache once
    torch.set_num_threads(2)
    cfg = TrainConfig(epochs=1, patience=1)
    model = new_model(split.x, cfg, config)
    empty = torch.zeros(0, config.n_samples)
    start = time.perf_counter()
    fit(model, split.x, split.y, empty, np.zeros(0, int), cfg, progress=False)
    return time.perf_counter() - start, len(clips)


def bench_predict(files: list[Path], model_path: Path, repeats: int,
                  precision: str = "auto", trace: bool = True) -> tuple[list[float], str]:
    """``trace=False`` times the path a predictor takes where TorchScript tracing fails (it
    is deprecated): tracing is made to fail, exactly as it would, and the model runs eagerly."""
    from src.prediction import Predictor

    torch.set_num_threads(1)
    failure = RuntimeError("benchmark: TorchScript made to fail")
    with (contextlib.nullcontext() if trace
          else mock.patch.object(torch.jit, "trace", side_effect=failure)):
        predictor = Predictor(model_path, precision=precision)
    blobs = [f.read_bytes() for f in files]
    for b in blobs:
        predictor.predict(b)  # warm-up: one pass (TorchScript profiling runs, soxr plans)
    times = []
    for _ in range(repeats):
        for b in blobs:
            t = time.perf_counter()
            predictor.predict(b)
            times.append((time.perf_counter() - t) * 1000)
    return times, predictor.precision


def bench_naive(files: list[Path], repeats: int) -> list[float]:
    import librosa

    torch.set_num_threads(1)
    model = reference_cnn().eval()
    blobs = [f.read_bytes() for f in files]

    def run(blob: bytes) -> int:
        y, sr = librosa.load(io.BytesIO(blob), sr=22050, duration=4.0)
        y = librosa.util.fix_length(y, size=88200)
        mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr))
        with torch.inference_mode():
            logits = model(torch.from_numpy(mel)[None, None])
        return int(logits.argmax())

    for b in blobs:
        run(b)  # the same warm-up as ours
    times = []
    for _ in range(repeats):
        for b in blobs:
            t = time.perf_counter()
            run(b)
            times.append((time.perf_counter() - t) * 1000)
    return times


def main() -> None:
    from src import registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--us8k", type=Path, default=ROOT.parent / "shared" / "us8k")
    parser.add_argument("--originals", type=Path,
                        default=ROOT.parent / "shared" / "us8k-originals")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    parser.add_argument("--feature-clips", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    model_path = args.model or registry.current(ROOT / "models")[1]
    files = sorted((args.originals / "audio").rglob("*.wav"))

    print(f"machine: {torch.get_num_threads()} torch threads available, torch {torch.__version__}")
    print(f"feature extraction: {bench_features(args.us8k, args.feature_clips):.1f} clips/s "
          f"(decode + resample + log-mel, 2 processes, {args.feature_clips} fold-1 clips)")
    seconds, n = bench_epoch(args.us8k, args.cache)
    print(f"training epoch: {seconds:.1f} s over {n} clips (folds 1, 2, 4-9; waveforms cached)")
    ours, precision = bench_predict(files, model_path, args.repeats)  # as served: "auto"
    fp32, _ = bench_predict(files, model_path, args.repeats, "float32")
    eager, eager_precision = bench_predict(files, model_path, args.repeats, trace=False)
    naive = bench_naive(files, args.repeats)
    print(f"predict, bytes -> label, 1 thread, {len(files)} original clips x {args.repeats}:")
    print(f"  urbansound  p50 {statistics.median(ours):6.2f} ms   "
          f"p95 {percentile(ours, 95):6.2f} ms   (as served: conv body in {precision})")
    print(f"  float32     p50 {statistics.median(fp32):6.2f} ms   "
          f"p95 {percentile(fp32, 95):6.2f} ms   (URBANSOUND_INFERENCE_PRECISION=float32)")
    print(f"  untraced    p50 {statistics.median(eager):6.2f} ms   "
          f"p95 {percentile(eager, 95):6.2f} ms   (where TorchScript fails: eager, "
          f"{eager_precision} body)")
    print(f"  naive stack p50 {statistics.median(naive):6.2f} ms   p95 {percentile(naive, 95):6.2f}"
          " ms   (librosa.load + melspectrogram + reference CNN)")
    print(f"  speed-up (p50 ratio): {statistics.median(naive) / statistics.median(ours):.2f}x")


if __name__ == "__main__":
    main()
