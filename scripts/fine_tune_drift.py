"""How much does a retrain on a few uploads cost the served model on recordings it never saw?

    .venv/bin/python scripts/fine_tune_drift.py [--model models/<version>.pt] [--frozen-bn]

The evidence behind ``URBANSOUND_GATE_MIN_TEST_CLIPS``. Fold 3 of ../shared/us8k (the served
model's test fold) is split by recording into halves A and B; ``src.train.retrain`` fine-tunes
the model exactly as a retrain job without a data set does (learning without forgetting, the
job's default epochs and LR) on 16 seen clips (folds 4-5), on 16 and 64 clips of half A, and on
all of half A, and each result is scored on half B. ``--frozen-bn`` also runs each with the
batch-norm statistics frozen, to ask whether they are what drifts. About a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from src import model as model_module
from src import registry
from src.datasets import Clip, read_us8k
from src.jobs import evaluate_checkpoint
from src.model import load_checkpoint
from src.settings import Settings
from src.train import retrain

ROOT = Path(__file__).resolve().parents[1]
US8K = ROOT.parent / "shared" / "us8k"


@contextlib.contextmanager
def frozen_batch_norm() -> Iterator[None]:
    """Training epochs that leave every batch-norm layer in eval mode (statistics kept)."""
    train_epoch = model_module.train_epoch

    def epoch(model: nn.Module, *args: object, **kwargs: object) -> float:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        train = model.train
        model.train = lambda mode=True: model  # type: ignore[method-assign]
        try:
            return train_epoch(model, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            model.train = train  # type: ignore[method-assign]

    model_module.train_epoch = epoch
    try:
        yield
    finally:
        model_module.train_epoch = train_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--frozen-bn", action="store_true")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    args = parser.parse_args()
    base = load_checkpoint(args.model or registry.current(ROOT / "models")[1])
    settings = Settings()

    def said(m: dict[str, Any], n: int) -> str:
        return (f"{round(m['accuracy'] * n)} of {n} right "
                f"(accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f})")

    def half(c: Clip) -> int:
        return int(hashlib.sha256(c.group.encode()).hexdigest(), 16) % 2

    fold3 = read_us8k(US8K, {3})
    a, b = [c for c in fold3 if half(c) == 0], [c for c in fold3 if half(c) == 1]
    rng = np.random.default_rng(0)

    def pick(clips: list[Clip], n: int) -> list[Clip]:
        return [clips[i] for i in sorted(rng.choice(len(clips), n, replace=False))]

    # the served side exactly as the gate measures it; the candidates' side is what retrain()
    # itself measures on its test clips
    print(f"{base['version']} on half B ({len(b)} clips, {len({c.group for c in b})} "
          f"recordings): {said(evaluate_checkpoint(base, b, args.cache), len(b))}")
    runs = {"16 seen clips (folds 4-5)": pick(read_us8k(US8K, {4, 5}), 16),
            "16 clips of half A": pick(a, 16), "64 clips of half A": pick(a, 64),
            f"all {len(a)} clips of half A": a}
    for name, new in runs.items():
        for frozen in (False, True) if args.frozen_bn else (False,):
            with frozen_batch_norm() if frozen else contextlib.nullcontext():
                result = retrain(base, new, [], b, "drift", epochs=settings.retrain_epochs,
                                 lr=settings.retrain_lr, cache_dir=args.cache,
                                 learn_without_forgetting=True)
            label = name + (", batch norm frozen" if frozen else "")
            print(f"fine-tuned on {label:<42} {said(result.test_metrics, len(b))}",
                  flush=True)


if __name__ == "__main__":
    main()
