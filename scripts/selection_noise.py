"""How far apart two runs must score before a split can tell them apart.

    .venv/bin/python scripts/selection_noise.py CHECKPOINT [CHECKPOINT ...] [--resamples 1000]

For checkpoints trained on folds 1, 2, 4-9 of ../shared/us8k (test: fold 3), prints each one's
validation macro-F1 (the 15% recording-grouped split that early stopping and the choice of the
served seed read) and fold-3 accuracy, each with its standard error from a bootstrap over
*recordings* (clips of one recording rise and fall together, so resampling clips would
understate the error), and the paired difference of every later checkpoint from the first.

Why: fold-3 accuracies of 0.677 and 0.654, or validation macro-F1s of 0.667 and 0.652, read
like a ranking; whether they are one is this script's answer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
US8K = ROOT.parent / "shared" / "us8k"


def recording_bootstrap(groups: np.ndarray, resamples: int, seed: int = 0) -> list[np.ndarray]:
    """Index sets, each drawn as whole recordings with replacement."""
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in names}
    return [np.concatenate([members[g] for g in rng.choice(names, len(names))])
            for _ in range(resamples)]


def main() -> None:
    from sklearn.metrics import f1_score

    from src.model import build_model, load_checkpoint, predict_logits
    from src.preprocessing import FeatureConfig
    from src.train import Split, split_clips

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, val_clips, test_clips, _ = split_clips(US8K, {3}, seed=0)
    sets = {"validation": Split.load(val_clips, FeatureConfig(), args.cache, False),
            "fold 3": Split.load(test_clips, FeatureConfig(), args.cache, False)}
    scores = {"validation": lambda y, p: f1_score(y, p, average="macro"),
              "fold 3": lambda y, p: float(np.mean(y == p))}
    draws = {name: recording_bootstrap(np.array([c.group for c in s.clips]), args.resamples)
             for name, s in sets.items()}
    for name, split in sets.items():
        score = scores[name]
        print(f"{name}: {len(split.clips)} clips, {len(set(c.group for c in split.clips))} "
              f"recordings ({'macro-F1' if name == 'validation' else 'accuracy'})")
        first: tuple[float, np.ndarray] | None = None
        for path in args.checkpoints:
            model = build_model(load_checkpoint(path))
            pred = predict_logits(model, split.x).argmax(1).numpy()
            point = score(split.y, pred)
            boot = np.array([score(split.y[i], pred[i]) for i in draws[name]])
            line = f"  {path.stem:<40} {point:.3f} ± {boot.std():.3f}"
            if first is None:
                first = point, boot
            else:  # the same resampled recordings for both: the error of the difference
                line += (f"   minus the first: {point - first[0]:+.3f} ± "
                         f"{(boot - first[1]).std():.3f}")
            print(line)


if __name__ == "__main__":
    main()
