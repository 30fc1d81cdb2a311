"""Cross-validation: the official UrbanSound8K protocol, and the one that chooses recipes.

Two protocols, one loop (``run_splits``), both running the served recipe (``train.fit_and_test``):

- ``official``: train on nine folds, test on the tenth, for each fold: the only figure that
  compares with published UrbanSound8K results (Salamon et al. 2014 insist on it: a random
  split puts slices of one recording on both sides and inflates accuracy by 10-20 points).
  Each finished fold is written to disk at once, so an interrupted run (hours on a CPU)
  resumes where it stopped; a changed recipe, feature config or data set starts afresh.
- ``grouped``: k recording-grouped, class-stratified folds *inside* the training folds (no
  fsID on two sides; the test fold is never read). Used to choose between recipe variants
  without looking at the test fold, and to see their spread.

Both report mean ± standard deviation (sample std, ddof=1) over the folds, the per-fold
table and the confusion matrix summed over the folds (every clip counted once, as its own
fold's model predicted it).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Clip, DatasetError, read_dataset
from .model import EpochCallback, TrainConfig, training_environment
from .preprocessing import CLASSES, FeatureConfig, encode_labels
from .train import Split, fit_and_test, hold_out_validation, set_threads

RESULTS_FORMAT = "urbansound-crossval/1"


class CrossvalError(DatasetError):
    """A data set the requested protocol cannot run on; the message says what is missing."""


@dataclass(frozen=True)
class Fold:
    """One train/test split: ``name`` labels it in tables and file names."""

    name: str
    train: np.ndarray  # indices into the clip list
    test: np.ndarray


# --------------------------------------------------------------------------- folds

def official_folds(clips: list[Clip], wanted: Iterable[int] | None = None) -> list[Fold]:
    """Leave-one-fold-out over the clips' official folds (all of them unless ``wanted``)."""
    if not clips:
        raise CrossvalError("no clips to cross-validate.")
    unfolded = sum(c.fold is None for c in clips)
    if unfolded:
        raise CrossvalError(
            f"{unfolded} of {len(clips)} clips have no fold: the official protocol needs the "
            "UrbanSound8K layout (metadata/UrbanSound8K.csv) or a manifest.csv with a fold "
            "column; `urbansound train` makes a recording-grouped split instead.")
    folds = np.array([c.fold for c in clips])
    present = sorted(set(folds.tolist()))
    chosen = sorted(set(wanted)) if wanted else present
    missing = [f for f in chosen if f not in present]
    if missing:
        raise CrossvalError(f"fold(s) {missing} have no clips here (folds present: "
                            f"{present}).")
    if len(present) < 2:
        raise CrossvalError(f"only fold {present} is present: at least two are needed "
                            "(one to train on, one to test).")
    return [Fold(f"fold{f}", np.flatnonzero(folds != f), np.flatnonzero(folds == f))
            for f in chosen]


def grouped_folds(clips: list[Clip], k: int = 5, seed: int = 0) -> list[Fold]:
    """k class-stratified folds with every recording (fsID) inside one fold only."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.array([c.group for c in clips])
    if len(set(groups.tolist())) < k:
        raise CrossvalError(f"{len(set(groups.tolist()))} recordings cannot fill {k} "
                            "recording-grouped folds.")
    labels = encode_labels([c.label for c in clips])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [Fold(f"group{i + 1}", tr, te)
            for i, (tr, te) in enumerate(splitter.split(np.zeros(len(clips)), labels, groups))]


def recordings_key(clips: list[Clip], test: np.ndarray) -> str:
    """Names the recordings a fold tests on: two runs whose scores differ can then say whether
    they tested the same clips (the splitter's shuffle is a library's, and libraries change)."""
    groups = sorted({str(clips[i].group) for i in test})
    return hashlib.sha256("\n".join(groups).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- running

FoldCallback = Callable[[dict[str, Any]], None]


def run_fold(data: Split, fold: Fold, cfg: TrainConfig, config: FeatureConfig,
             on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train the recipe on ``fold.train`` (validation held out inside it, by recording) and
    score it on ``fold.test``: one row of the per-fold table."""
    start = time.perf_counter()
    keep, hold = hold_out_validation([data.clips[i] for i in fold.train], cfg.validation,
                                     cfg.split_seed)
    # index the full set once per side: no intermediate copy of the training side (the full
    # data set's waveforms are 3 GB in memory, each side a copy of its share)
    _, metrics, history = fit_and_test(data.subset(fold.train[keep]),
                                       data.subset(fold.train[hold]),
                                       data.subset(fold.test), cfg, config, on_epoch,
                                       progress=False)
    return {"fold": fold.name, "recordings": recordings_key(data.clips, fold.test),
            "n_train": len(keep), "n_validation": len(hold),
            "n": metrics["n"], "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "loss": metrics["loss"], "epochs": len(history),
            "per_class_f1": {c: s["f1"] for c, s in metrics["per_class"].items()},
            "confusion_matrix": metrics["confusion_matrix"],
            # per row: the official protocol resumes rows another install may have computed
            "environment": training_environment(),
            "seconds": round(time.perf_counter() - start, 1)}


def run_splits(
    data: Split, folds: list[Fold], cfg: TrainConfig, config: FeatureConfig,
    results_dir: Path | None = None, progress: bool = True,
    on_fold: FoldCallback | None = None,
) -> list[dict[str, Any]]:
    """Every fold's row; with ``results_dir``, rows already there are reused, new ones saved
    the moment they finish (a crash loses at most the fold in progress)."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    bar = tqdm(folds, desc="cross-validation", unit="fold", disable=not progress)
    for fold in bar:
        bar.set_postfix_str(fold.name)
        path = results_dir / f"{fold.name}.json" if results_dir else None
        row = _read_row(path)
        if row is None:
            def show(r: dict[str, Any], name: str = fold.name) -> None:
                bar.set_postfix_str(f"{name} epoch {r['epoch']}/{r['epochs']} "
                                    f"val F1 {r['val_f1'] or 0:.3f}")

            row = run_fold(data, fold, cfg, config, show)
            if path is not None:
                _write_atomically(path, row)
        else:
            row["resumed"] = True
        rows.append(row)
        if on_fold:
            on_fold(row)
    return rows


def summarise(rows: list[dict[str, Any]], classes: tuple[str, ...] = CLASSES) -> dict[str, Any]:
    """Mean ± std over the folds, the per-fold table, the summed confusion matrix."""
    cm = np.sum([np.asarray(r["confusion_matrix"]) for r in rows], axis=0)
    summary: dict[str, Any] = {"n_folds": len(rows), "n": int(cm.sum())}
    for key in ("accuracy", "macro_f1"):
        values = [r[key] for r in rows]
        summary[f"{key}_mean"] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    summary["pooled_accuracy"] = float(np.trace(cm) / max(cm.sum(), 1))
    summary["per_fold"] = [{k: v for k, v in r.items() if k != "confusion_matrix"}
                           for r in rows]
    summary["classes"] = list(classes)
    summary["confusion_matrix"] = cm.tolist()
    return summary


# --------------------------------------------------------------------------- protocols

def official(
    data_dir: Path, folds: Iterable[int] | None = None, cfg: TrainConfig | None = None,
    config: FeatureConfig | None = None, cache_dir: Path | None = None,
    state_dir: Path | None = None, progress: bool = True, fresh: bool = False,
    on_fold: FoldCallback | None = None,
) -> dict[str, Any]:
    """The UrbanSound8K protocol on ``data_dir``; per-fold results under
    ``state_dir/crossval/<run key>/`` (see ``run_key``) unless ``state_dir`` is None."""
    cfg, config = cfg or TrainConfig(), config or FeatureConfig()
    set_threads()
    clips = read_dataset(data_dir)
    official_folds(clips, folds)  # bad input fails before anything is decoded
    data = Split.load(clips, config, cache_dir, progress)
    chosen = official_folds(data.clips, folds)  # clips that failed to decode are left out
    key = run_key(data.clips, cfg, config)
    results_dir = None
    if state_dir is not None:
        results_dir = Path(state_dir) / "crossval" / key
        if fresh:
            for old in results_dir.glob("fold*.json"):
                old.unlink()
        _write_atomically(results_dir / "run.json", {
            "format": RESULTS_FORMAT, "data": str(Path(data_dir).resolve()),
            "clips": len(data.clips), "train_config": cfg.to_dict(),
            "feature_config": config.to_dict()})
    rows = run_splits(data, chosen, cfg, config, results_dir, progress, on_fold)
    return {"protocol": "official", "data": str(data_dir),
            "test_folds": [int(f.name.removeprefix("fold")) for f in chosen], "run_key": key,
            "results_dir": str(results_dir) if results_dir else None,
            "skipped": len(clips) - len(data.clips), "train_config": cfg.to_dict(),
            **summarise(rows)}


def grouped_cv(
    data_dir: Path, exclude_folds: set[int] | None = None, k: int = 5,
    cfg: TrainConfig | None = None, config: FeatureConfig | None = None,
    cache_dir: Path | None = None, seed: int = 0, progress: bool = False,
    on_fold: FoldCallback | None = None,
) -> dict[str, Any]:
    """The validation protocol for choosing a recipe: ``k`` recording-grouped folds over the
    clips outside ``exclude_folds`` (the test folds, never read). ``seed`` fixes which
    recordings fall together, so variants are compared on the same folds."""
    cfg, config = cfg or TrainConfig(), config or FeatureConfig()
    set_threads()
    clips = [c for c in read_dataset(data_dir) if c.fold not in (exclude_folds or set())]
    data = Split.load(clips, config, cache_dir, progress)
    rows = run_splits(data, grouped_folds(data.clips, k, seed), cfg, config, None, progress,
                      on_fold)
    return {"protocol": f"grouped {k}-fold", "data": str(data_dir),
            "excluded_folds": sorted(exclude_folds or []), "split_seed": seed,
            "train_config": cfg.to_dict(), **summarise(rows)}


# --------------------------------------------------------------------------- results on disk

def run_key(clips: list[Clip], cfg: TrainConfig, config: FeatureConfig) -> str:
    """Names a run by what decides its results: the clips (paths, labels, folds), the recipe
    and the features. Resuming reuses only folds computed under the same key."""
    identity = {"clips": sorted((str(c.path.resolve()), c.label, c.fold) for c in clips),
                "train_config": cfg.to_dict(), "feature_config": config.to_dict()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def _read_row(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):  # a torn or foreign file: compute the fold again
        return None
    return row if isinstance(row, dict) and "confusion_matrix" in row else None


def _write_atomically(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
