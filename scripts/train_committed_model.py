"""Reproduce the committed model: train on folds 1, 2, 4-9 of ../shared/us8k, test on fold 3,
then fine-tune on the validation recordings, publish both versions and write the model card.

    URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/train_committed_model.py \
        [--from-checkpoint FILE] [--models models]

Step 1 is exactly ``urbansound train --data ../shared/us8k --test-fold 3 --epochs 40
--patience 12 --seed 0``. Step 2 is ``src.train.retrain`` (what the worker runs) with the
validation recordings as the "new" clips, so the final model has seen every training-fold
recording once its epoch count was chosen. One torch thread makes runs repeatable here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from src import registry
from src.model import TrainConfig, save_checkpoint
from src.model_card import render
from src.train import retrain, split_clips, train

ROOT = Path(__file__).resolve().parents[1]
US8K = ROOT.parent / "shared" / "us8k"
REPRODUCE = """URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/train_committed_model.py
# step 1 alone: urbansound train --data ../shared/us8k --test-fold 3 --epochs 40 --patience 12
.venv/bin/urbansound evaluate --data ../shared/us8k --folds 3 --json"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=US8K)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    parser.add_argument("--from-checkpoint", type=Path, default=None,
                        help="skip step 1 and fine-tune this step-1 checkpoint")
    args = parser.parse_args()
    tmp = ROOT / "var" / "tmp"

    base_version = registry.new_version_name()
    if args.from_checkpoint:
        base = torch.load(args.from_checkpoint, map_location="cpu", weights_only=True)
        base["version"] = base_version
    else:
        cfg = TrainConfig(epochs=40, patience=12, seed=0)
        base = train(args.data, {3}, cfg, cache_dir=args.cache, version=base_version).checkpoint
    base["data"]["source_dir"] = "../shared/us8k"
    print(f"step 1 ({base_version}): fold-3 accuracy {base['metrics']['accuracy']:.3f}, "
          f"macro-F1 {base['metrics']['macro_f1']:.3f}")

    train_clips, val_clips, test_clips, how = split_clips(args.data, {3}, seed=0)
    final_version = registry.new_version_name()
    # ema_decay=0.995: the committed model was fine-tuned before retrain's default became
    # "about one epoch"; pinned so this script reproduces it bit for bit.
    result = retrain(base, val_clips, train_clips, test_clips, final_version, epochs=8, lr=3e-4,
                     cache_dir=args.cache, progress=True, ema_decay=0.995)
    final = result.checkpoint
    final["metrics"]["test_folds"] = [3]
    final["data"].update(source_dir="../shared/us8k", split=how,
                         validation=base["data"]["validation"])
    m = final["metrics"]
    print(f"step 2 ({final_version}): fold-3 accuracy {m['accuracy']:.3f}, "
          f"macro-F1 {m['macro_f1']:.3f}")

    for ckpt in (base, final):
        path = save_checkpoint(ckpt, tmp / f"{ckpt['version']}.pt")
        registry.publish(path, ckpt["version"], models_dir=args.models)
    registry.activate(base_version, models_dir=args.models)
    registry.activate(final_version, models_dir=args.models)
    (args.models / "MODEL_CARD.md").write_text(render(final, REPRODUCE))
    print(f"published {base_version} -> {final_version} (served); card: models/MODEL_CARD.md")


if __name__ == "__main__":
    main()
