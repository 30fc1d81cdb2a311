"""Is BirdNET's embedding worth distilling? A linear probe on the grouped protocol's folds.

    .venv/bin/python scripts/birdnet_probe.py      # ~3 min the first time (embeddings), then s

The go / no-go of 5 Dec (docs/trial-decisions.md): a standardised logistic regression (C=0.1,
fixed before it ran) on BirdNET V2.4's embedding of each clip (``src.birdnet``), trained and
scored on the grouped 3-fold protocol's own folds (``crossval.grouped_folds``, k=3, seed 0)
inside the training folds of ../shared/us8k; fold 3 never read. It went on if the probe's
mean accuracy reached the served recipe's grouped mean, 0.626.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from src.birdnet import embed_clips
from src.crossval import grouped_folds
from src.datasets import read_us8k
from src.distill import linear_probe
from src.preprocessing import CLASSES

ROOT = Path(__file__).resolve().parents[1]
US8K = ROOT.parent / "shared" / "us8k"
MACHINE = ("air_conditioner", "engine_idling", "jackhammer")


def main() -> None:
    clips = [c for c in read_us8k(US8K) if c.fold != 3]
    x = embed_clips(clips, ROOT / "var" / "cache")
    y = np.array([CLASSES.index(c.label) for c in clips])
    machine = np.isin(y, [CLASSES.index(c) for c in MACHINE])
    accs, f1s, machine_accs = [], [], []
    for fold in grouped_folds(clips, k=3, seed=0):
        pred = linear_probe().fit(x[fold.train], y[fold.train]).predict(x[fold.test])
        right = pred == y[fold.test]
        accs.append(right.mean())
        f1s.append(f1_score(y[fold.test], pred, average="macro"))
        machine_accs.append(right[machine[fold.test]].mean())
    print(f"BirdNET probe, grouped 3-fold: accuracy {np.mean(accs):.3f} ± "
          f"{np.std(accs, ddof=1):.3f} (per fold {', '.join(f'{a:.3f}' for a in accs)}), "
          f"macro-F1 {np.mean(f1s):.3f} ± {np.std(f1s, ddof=1):.3f}, machine-noise classes "
          f"{np.mean(machine_accs):.3f}")


if __name__ == "__main__":
    main()
