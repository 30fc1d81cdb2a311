"""The training pipeline: data folder → splits → cached waveforms → fitted, evaluated model.

Also ``retrain``: fine-tune a served checkpoint on new clips merged with its training data,
which is what the Celery worker runs. Both end in the same self-describing checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import Clip, DatasetError, named_test_split, read_dataset, summarise
from .distill import Teachers
from .features import load_waveforms
from .model import (
    AudioCNN,
    Checkpoint,
    EpochCallback,
    TrainConfig,
    build_model,
    evaluate_model,
    fit,
    make_checkpoint,
    new_model,
)
from .preprocessing import CLASSES, FeatureConfig, encode_labels, group_split
from .testset import spec_for, spec_of, with_scores


@dataclass
class Split:
    clips: list[Clip]
    x: torch.Tensor
    y: np.ndarray

    @classmethod
    def load(cls, clips: list[Clip], config: FeatureConfig, cache_dir: Path | None,
             progress: bool = True) -> Split:
        loaded = load_waveforms(clips, config, cache_dir, progress=progress)
        for clip, reason in loaded.errors[:5]:  # stderr: a --json stdout stays one object
            print(f"warning: skipped {clip.path.name}: {reason}", file=sys.stderr)
        return cls(loaded.clips, torch.from_numpy(loaded.waveforms),
                   encode_labels([c.label for c in loaded.clips]))

    def subset(self, idx: np.ndarray | list[int]) -> Split:
        """The clips at ``idx``, sharing nothing the caller could mutate by accident."""
        idx = np.asarray(idx, dtype=np.int64)
        return Split([self.clips[i] for i in idx], self.x[torch.from_numpy(idx)], self.y[idx])


def hold_out_validation(clips: list[Clip], fraction: float = 0.15, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) inside a training side, whole recordings on one side;
    ``fraction`` 0 keeps every clip for training (a refit) and validates on none."""
    if fraction == 0:
        return np.arange(len(clips)), np.array([], dtype=np.int64)
    labels = encode_labels([c.label for c in clips])
    return group_split(labels, np.array([c.group for c in clips]), fraction, seed)


def split_clips(
    data_dir: Path, test_folds: set[int] | None, val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[Clip], list[Clip], list[Clip], str]:
    """train / validation / test, never splitting a recording, and a sentence saying how.

    Test: the given folds; else a ``test/`` folder beside ``train/``; else a group split.
    Validation always comes from inside the training side.
    """
    data_dir = Path(data_dir)
    named = named_test_split(data_dir, test_folds)
    if test_folds and (named is None or named[0] != "folds"):
        raise DatasetError(f"{data_dir}: no clips in test fold(s) {sorted(test_folds)}.")
    if named is not None:
        kind, train, test, _ = named
        how = f"test = fold(s) {sorted(test_folds or [])}" if kind == "folds" else \
            f"test = {data_dir / 'test'}"
    else:
        clips = read_dataset(data_dir)
        keep, hold = hold_out_validation(clips, 0.2, seed)
        train, test = [clips[i] for i in keep], [clips[i] for i in hold]
        how = "test = a 20% recording-grouped split"
    if not train or not test:
        raise DatasetError(f"{data_dir}: the split left no training or no test clips ({how}).")
    keep, hold = hold_out_validation(train, val_fraction, seed)
    return [train[i] for i in keep], [train[i] for i in hold], test, how


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    model: AudioCNN
    test_metrics: dict[str, Any]
    history: list[dict[str, Any]]


def train(
    data_dir: Path, test_folds: set[int] | None = None, cfg: TrainConfig | None = None,
    config: FeatureConfig | None = None, cache_dir: Path | None = None,
    version: str = "dev", on_epoch: EpochCallback | None = None, progress: bool = True,
    teachers: list[Checkpoint] | None = None,
) -> TrainResult:
    """Train from scratch; with ``teachers`` (checkpoints) distil their ensemble into it."""
    cfg = cfg or TrainConfig()
    config = config or FeatureConfig()
    set_threads()
    train_clips, val_clips, test_clips, how = split_clips(data_dir, test_folds,
                                                          cfg.validation, cfg.split_seed)
    tr = Split.load(train_clips, config, cache_dir, progress)
    va = Split.load(val_clips, config, cache_dir, progress)
    te = Split.load(test_clips, config, cache_dir, progress)
    model, metrics, history = fit_and_test(tr, va, te, cfg, config, on_epoch, progress, teachers,
                                           cache_dir)
    metrics["split"] = how
    metrics["test_folds"] = sorted(test_folds) if test_folds else None
    kind = "folds" if test_folds else ("folder" if how.startswith("test = ") and
                                       "fold" not in how and "split" not in how else "split")
    data = {"train": summarise(tr.clips), "validation": summarise(va.clips),
            "test": summarise(te.clips), "source_dir": str(data_dir), "split": how,
            "test_set": with_scores(spec_for(te.clips, kind, how.removeprefix("test = "),
                                             sorted(test_folds or [])), version, metrics),
            "train_config": cfg.to_dict(),
            "teachers": [t["version"] for t in teachers or []]}
    ckpt = make_checkpoint(model, CLASSES, version, None, metrics, data, history)
    return TrainResult(ckpt, model, metrics, history)


def fit_and_test(
    tr: Split, va: Split, te: Split, cfg: TrainConfig, config: FeatureConfig,
    on_epoch: EpochCallback | None = None, progress: bool = True,
    teachers: list[Checkpoint] | None = None, cache_dir: Path | None = None,
) -> tuple[AudioCNN, dict[str, Any], list[dict[str, Any]]]:
    """The recipe on splits already in memory: a fresh model (band statistics from ``tr``),
    fitted with early stopping on ``va``, scored on ``te``. ``train`` and both cross-validation
    protocols (``crossval``) run exactly this, so what they measure is the served recipe.

    ``cfg.birdnet_teacher`` without ``teachers`` is refused rather than ignored: the probe
    teaches beside the CNN teachers, and a run that silently trained without it would still
    say ``birdnet_teacher`` in its ``train_config``."""
    if cfg.birdnet_teacher and not teachers:
        raise ValueError("birdnet_teacher teaches beside CNN teachers: pass teachers too")
    model = new_model(tr.x, cfg, config)
    teacher = (Teachers([build_model(t) for t in teachers], model, cfg.distill_temperature)
               if teachers else None)
    clip_probs = None
    if cfg.birdnet_teacher and teacher is not None:
        from .birdnet import probe_soft_targets  # optional packages: only when asked

        clip_probs = probe_soft_targets(tr.clips, cache_dir, cfg.distill_temperature,
                                        cfg.birdnet_folds, progress)
    history = fit(model, tr.x, tr.y, va.x, va.y, cfg, on_epoch=on_epoch, progress=progress,
                  teachers=teacher, clip_probs=clip_probs)
    return model, evaluate_model(model, te.x, te.y, CLASSES), history


def retrain(
    base: Checkpoint, new_clips: list[Clip], train_clips: list[Clip], test_clips: list[Clip],
    version: str, epochs: int = 8, lr: float = 3e-4, cache_dir: Path | None = None,
    on_epoch: EpochCallback | None = None, seed: int = 0, progress: bool = False,
    ema_decay: float | None = None, carried_spec: dict[str, Any] | None = None, test_how: str = "",
    learn_without_forgetting: bool = False,
) -> TrainResult:
    """Fine-tune ``base`` on ``new_clips`` merged with ``train_clips``; evaluate on the fixed
    ``test_clips`` so the quality gate compares like with like.

    Starting from the served weights (not from scratch) keeps what the model knows and makes a
    retrain take minutes; the LR is lower than for training from scratch, and the
    standardisation statistics are kept so the base model's features mean the same thing.
    With ``learn_without_forgetting`` (no base data to rehearse) the base model is also the
    teacher (Li & Hoiem, 2016): its soft predictions keep the classes the uploads lack.

    The new checkpoint carries everything the next retrain needs: ``carried_spec`` (the test set
    it must be graded on, from ``retrain_data``; the base's own when not given; ``test_how``
    describes the clips it was graded on this time), the class
    list, the data it saw and its parent, so provenance survives any number of promotions.
    """

    set_threads()
    model = build_model(base)
    config = model.config
    merged = list(train_clips) + list(new_clips)
    try:
        keep, hold = hold_out_validation(merged, 0.15, seed)
    except ValueError:  # too few recordings (per class) to hold some out: stop on the
        # training loss, never on the test set, which would tilt the gate to the candidate
        keep, hold = np.arange(len(merged)), np.array([], dtype=int)
    tr = Split.load([merged[i] for i in keep], config, cache_dir, progress)
    va = Split.load([merged[i] for i in hold], config, cache_dir, progress)
    te = Split.load(test_clips, config, cache_dir, progress)
    train_cfg = base.get("data", {}).get("train_config", {})
    batch_size = train_cfg.get("batch_size", 32)
    steps_per_epoch = max(2, len(tr.x) // batch_size)
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, patience=max(3, epochs // 2),
                      # a short fine-tune has few steps: average over about one epoch, or the
                      # EMA would stay at the base weights
                      ema_decay=ema_decay if ema_decay is not None else 1 - 1 / steps_per_epoch,
                      widths=tuple(base["arch"]["widths"]), dropout=base["arch"]["dropout"],
                      # the head as build_model read it (older checkpoints: its defaults)
                      freq_pool=model.freq_pool, envelope=model.envelope is not None,
                      time_pool=model.time_pool, residual=model.residual,
                      batch_size=batch_size)
    teacher = (Teachers([build_model(base)], model, cfg.distill_temperature)
               if learn_without_forgetting else None)
    history = fit(model, tr.x, tr.y, va.x, va.y, cfg, on_epoch=on_epoch, progress=progress,
                  teachers=teacher)
    metrics = evaluate_model(model, te.x, te.y, tuple(base["classes"]))
    spec = dict(carried_spec or spec_of(base))
    graded_on_spec = not learn_without_forgetting  # else: a held-out slice of the uploads
    metrics["split"] = f"test = {test_how or spec.get('description') or 'the base model test set'}"
    # fold figures only when the folds were what it was graded on (not a held-out upload slice)
    metrics["test_folds"] = (spec.get("folds") or None) if graded_on_spec else None
    if graded_on_spec:
        spec = with_scores(spec, version, metrics)
    base_data = base.get("data") or {}
    data = {"train": summarise(tr.clips), "validation": summarise(va.clips),
            "new_clips": summarise(list(new_clips)), "test": summarise(te.clips),
            "test_set": spec, "graded_on": test_how or spec.get("description"),
            "fine_tuned_from": base["version"], "learn_without_forgetting": teacher is not None,
            "source_dir": base_data.get("source_dir"),
            "lineage": [base["version"], *(base_data.get("lineage") or [])][:50],
            "train_config": cfg.to_dict()}
    ckpt = make_checkpoint(model, tuple(base["classes"]), version, base["version"], metrics,
                           data, history)
    return TrainResult(ckpt, model, metrics, history)


def set_threads(n: int | None = None) -> None:
    """Use every usable core for training unless told otherwise (URBANSOUND_TORCH_THREADS)."""
    from .cpu import torch_threads
    from .settings import Settings

    torch.set_num_threads(n or torch_threads(settings=Settings()))
