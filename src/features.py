"""Decoded-clip cache: decode + resample once, in parallel, then every epoch reads memory.

The cache holds the fixed-length waveform ``load_clip`` returns, keyed by the file's sha256
and the parts of the feature config that shape the waveform. Waveforms (not log-mels) are
cached so waveform augmentation stays possible and the log-mel front end runs in exactly one
place — the model's own ``LogMel`` layer — in training and in serving.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .datasets import Clip
from .files import file_sha256
from .preprocessing import AudioError, FeatureConfig, load_clip

WAVEFORM_KEYS = ("sample_rate", "clip_seconds", "pad_mode", "target_dbfs")


def config_key(config: FeatureConfig) -> str:
    wanted = {k: getattr(config, k) for k in WAVEFORM_KEYS}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Loaded:
    waveforms: np.ndarray  # (n, samples) float32
    clips: list[Clip]  # the clips that loaded, aligned with waveforms
    errors: list[tuple[Clip, str]]  # clips that did not, with the reason


def _load_one(args: tuple[Path, FeatureConfig, Path | None]) -> tuple[np.ndarray | None, str]:
    path, config, cache_dir = args
    try:
        if cache_dir is None:
            return load_clip(path, config), ""
        target = cache_dir / config_key(config) / f"{file_sha256(path)}.npy"
        if target.is_file():
            return np.load(target), ""
        y = load_clip(path, config)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, y)
        os.replace(tmp, target)  # concurrent writers of one key never expose a partial file
        return y, ""
    except AudioError as exc:
        return None, exc.message


def load_waveforms(
    clips: list[Clip], config: FeatureConfig, cache_dir: Path | None = None,
    workers: int | None = None, progress: bool = True,
) -> Loaded:
    """Bad files are reported, not fatal: one corrupt clip must not sink a training run."""
    workers = workers or min(len(clips) // 64 + 1, os.cpu_count() or 1)
    jobs = [(c.path, config, cache_dir) for c in clips]
    bar: dict[str, Any] = dict(total=len(jobs), desc="decoding clips", unit="clip",
                               disable=not progress, leave=False)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_load_one, jobs, chunksize=16), **bar))
    else:
        results = list(tqdm(map(_load_one, jobs), **bar))
    good = [(c, y) for c, (y, _) in zip(clips, results, strict=True) if y is not None]
    errors = [(c, e) for c, (y, e) in zip(clips, results, strict=True) if y is None]
    waves = np.stack([y for _, y in good]) if good else np.zeros((0, config.n_samples), "f4")
    return Loaded(waves, [c for c, _ in good], errors)
