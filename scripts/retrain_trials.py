"""What the retraining path does to a served model, with and without the base as teacher.

    URBANSOUND_TORCH_THREADS=2 .venv/bin/python scripts/retrain_trials.py [BASE.pt ...] \
        [--seeds 0 1 2] [--rehearse train|train+validation]

``src.train.retrain`` with the notebook's demo settings: the us8k-originals clips outside fold 3
as the uploads, 400 rehearsed base clips, 3 epochs at the retrain LR. The rehearsed clips come
from the training split only by default, so the validation split (290 clips) is unseen and
scores each run; fold 3 is reported beside it. Each seed runs on the labels alone and with the
base model as teacher (``learn_without_forgetting``). Evidence for docs/trial-decisions.md
(3 Dec, 18:16); prints the change from the base, per run and on average.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from recipe_trials import US8K

ROOT = Path(__file__).resolve().parents[1]
BASES = ("20261202T214819Z-c67884", "20261203T172607Z-0b0aa0")


def main() -> None:
    from src import retrain_data
    from src.datasets import read_dataset
    from src.model import build_model, evaluate_model, load_checkpoint
    from src.preprocessing import CLASSES
    from src.settings import Settings
    from src.train import Split, retrain, split_clips

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bases", type=Path, nargs="*",
                        default=[ROOT / "models" / f"{b}.pt" for b in BASES])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rehearse", choices=("train", "train+validation"), default="train")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    args = parser.parse_args()
    tr, va, te, _ = split_clips(US8K, {3}, seed=0)
    uploads = [c for c in read_dataset(US8K.parent / "us8k-originals") if c.fold != 3]
    rehearsed = retrain_data.subsample(tr + (va if args.rehearse != "train" else []), 400)
    changes: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for path in args.bases:
        base = load_checkpoint(path)
        model = build_model(base)
        val, test = (Split.load(c, model.config, args.cache, False) for c in (va, te))
        before = (evaluate_model(model, val.x, val.y, CLASSES)["macro_f1"],
                  base["metrics"]["macro_f1"])
        print(f"{base['version']}: validation {before[0]:.3f}, fold 3 {before[1]:.3f}", flush=True)
        for distil in (False, True):
            for seed in args.seeds:
                run = retrain(base, uploads, rehearsed, va, "trial", epochs=3,
                              lr=Settings().retrain_lr, cache_dir=args.cache, seed=seed,
                              learn_without_forgetting=distil)
                after = (run.test_metrics["macro_f1"],
                         evaluate_model(run.model, test.x, test.y, CLASSES)["macro_f1"])
                changes[distil].append((after[0] - before[0], after[1] - before[1]))
                print(f"  {'base as teacher' if distil else 'labels alone':<15} seed {seed}: "
                      f"validation {after[0]:.3f}, fold 3 {after[1]:.3f}", flush=True)
    for distil, runs in changes.items():
        mean = np.mean(runs, axis=0)
        print(f"{'base as teacher' if distil else 'labels alone'}: mean change validation "
              f"{mean[0]:+.3f}, fold 3 {mean[1]:+.3f} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
