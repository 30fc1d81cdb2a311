"""Long-recording analysis benchmark: real-time factor and peak memory of ``analyze``.

    .venv/bin/python benchmarks/bench_analyze.py [--seconds 600] [--rate 48000] [--channels 2]
        [--threads 2] [--repeats 3] [--model PATH] [--json] [--file WAV]

Writes (once, block by block) a recording of ``--seconds`` of 16-bit PCM at ``--rate`` Hz with
``--channels`` channels — real UrbanSound8K clips from ../shared/us8k laid end to end when
they are there, else a synthetic mix of noise and tones, never silence (a silent window skips
the model and would flatter the figure) — then analyses it in a fresh child process:

* **real-time factor**: seconds of audio per second of wall time, for the whole
  ``analysis.analyse`` call (open, decode, resample, windows, model, timeline); best of
  ``--repeats`` runs after one warm-up (TorchScript's profiling passes, soxr's set-up);
* **CPU time** of the same runs (``time.process_time``, all threads): seconds of audio per
  CPU-second moves far less than wall time when other work shares the cores (the real-time
  factor is printed with the load average it was measured under); decoding runs in its own
  thread beside the model, so on free cores the wall time is below the CPU time;
* **peak memory of the analysis**: the child imports torch and loads the model, resets the
  kernel's high-water mark (``/proc/self/clear_refs``), analyses, and reports ``VmHWM`` minus
  the resident size just before: what the analysis itself added at its peak;
* **peak memory from torch import**: ``ru_maxrss`` at the end minus the resident size right
  after ``import torch`` (model load and tracing included): the whole cost of analysing a
  file in a process that already has torch.

``--json`` prints one object (the test suite runs this to check the memory bound).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
US8K = ROOT.parent / "shared" / "us8k"


def write_recording(path: Path, seconds: float, rate: int, channels: int,
                    us8k: Path | None = US8K) -> Path:
    """A long WAV written a few seconds at a time (the writer never holds the whole file)."""
    import numpy as np
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(0)
    clips = sorted((us8k / "audio" / "fold1").glob("*.flac"))[:200] if us8k else []
    block = 4 * rate
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, subtype="PCM_16") as f:
        written, i = 0, 0
        total = round(seconds * rate)
        while written < total:
            if clips:
                y, sr = sf.read(clips[i % len(clips)], dtype="float32", always_2d=True)
                y = soxr.resample(y.mean(axis=1), sr, rate)[:block]
                y = np.resize(y, block) if y.size else np.zeros(block, np.float32)
            else:
                t = np.arange(block) / rate
                y = (0.1 * rng.standard_normal(block)
                     + 0.2 * np.sin(2 * np.pi * (200 + 50 * (i % 17)) * t)).astype(np.float32)
            peak = float(np.abs(y).max()) or 1.0
            y = 0.5 * y / peak + 1e-3 * rng.standard_normal(block)  # never digital silence
            n = min(block, total - written)
            f.write(np.repeat(y[:n, None], channels, axis=1).astype(np.float32))
            written += n
            i += 1
    return path


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child(path: Path, model: str | None, threads: int, repeats: int) -> dict:
    """Runs in a fresh process: memory first (one cold analysis), then the timed runs."""
    import resource

    import torch

    after_torch = _rss_kib()
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from src import registry
    from src.analysis import Options, analyse
    from src.prediction import Predictor

    predictor = Predictor(model or registry.current(ROOT / "models")[1])
    options = Options()
    before = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    first = analyse(path, predictor, options)
    analysis_peak = _hwm_kib() - before
    whole_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - after_torch
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        result = analyse(path, predictor, options)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    classified = sum(w.probabilities is not None for w in result.windows)
    return {
        "file_s": round(first.duration_s, 3), "windows": len(result.windows),
        "windows_classified": classified, "threads": threads,
        "wall_s_best": round(min(times), 3), "wall_s_all": [round(t, 3) for t in times],
        "realtime_factor": round(first.duration_s / min(times), 1),
        "cpu_s_best": round(min(cpu), 3),
        "audio_s_per_cpu_s": round(first.duration_s / min(cpu), 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "peak_mb_analysis": round(analysis_peak / 1024, 1),
        "peak_mb_from_torch_import": round(whole_peak / 1024, 1),
        "model_version": result.model_version,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=int, default=48_000)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--file", type=Path, default=None, help="Analyse this file instead.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.threads, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or write_recording(Path(tmp) / "long.wav", args.seconds, args.rate,
                                            args.channels, US8K if US8K.is_dir() else None)
        cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(args.threads),
               "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"the measuring process failed:\n{out.stderr}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        figures.update(rate=args.rate, channels=args.channels,
                       file_mb=round(path.stat().st_size / 2**20, 1))
    if args.json:
        print(json.dumps(figures))
        return
    print(f"analyze: {figures['file_s']:.0f} s of {args.rate} Hz x {args.channels} ch 16-bit WAV "
          f"({figures['file_mb']} MB), {figures['windows']} windows "
          f"({figures['windows_classified']} classified), {args.threads} torch threads")
    print(f"  real-time factor {figures['realtime_factor']:.0f}x  (best wall "
          f"{figures['wall_s_best']:.2f} s of {figures['wall_s_all']}; load average "
          f"{figures['load_average']})")
    print(f"  CPU time {figures['cpu_s_best']:.2f} s (all threads): "
          f"{figures['audio_s_per_cpu_s']:.0f} s of audio per CPU-second")
    print(f"  peak memory: analysis +{figures['peak_mb_analysis']:.0f} MB; "
          f"+{figures['peak_mb_from_torch_import']:.0f} MB over a process that has only "
          "imported torch (model load included)")


if __name__ == "__main__":
    main()
