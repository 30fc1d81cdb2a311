"""Training actually learns, early stopping restores the best epoch, retrain fine-tunes."""

from __future__ import annotations

import numpy as np
import torch

from src.datasets import read_class_folders
from src.model import TrainConfig, fit, new_model
from src.preprocessing import FeatureConfig, encode_labels
from src.train import Split, retrain


def test_quick_training_on_synthetic_data_learns(quick_model):
    m = quick_model.test_metrics
    assert m["n"] >= 50
    assert m["accuracy"] >= 0.6 and m["macro_f1"] >= 0.55  # chance is 0.1
    losses = [h["loss"] for h in quick_model.history]
    assert losses[-1] < losses[0]


def test_early_stopping_restores_the_best_epoch(synthetic_data, tmp_path):
    clips = read_class_folders(synthetic_data / "train")[:60]
    split = Split.load(clips, FeatureConfig(), tmp_path, progress=False)
    cfg = TrainConfig(epochs=30, patience=2, lr=3e-2, seed=0)  # too hot on purpose: it plateaus
    model = new_model(split.x, cfg, FeatureConfig())
    history = fit(model, split.x, split.y, split.x[:20], split.y[:20], cfg, progress=False)
    assert len(history) < 30  # stopped early
    best = max(h["val_f1"] for h in history)
    from src.model import evaluate_model

    restored = evaluate_model(model, split.x[:20], split.y[:20], tuple(range(10)))
    assert abs(restored["macro_f1"] - best) < 1e-6 or restored["macro_f1"] >= best


def test_retrain_fine_tunes_from_the_checkpoint(quick_model, synthetic_data, tmp_path):
    train = read_class_folders(synthetic_data / "train")
    test = read_class_folders(synthetic_data / "test")
    new, base_train = train[::4], [c for i, c in enumerate(train) if i % 4]
    result = retrain(quick_model.checkpoint, new, base_train, test, "quick-2", epochs=2,
                     cache_dir=tmp_path)
    ckpt = result.checkpoint
    assert ckpt["parent"] == "quick-1" and ckpt["version"] == "quick-2"
    assert ckpt["data"]["new_clips"]["n"] == len(new)
    assert ckpt["norm_mean"] == quick_model.checkpoint["norm_mean"]  # features keep meaning
    assert result.test_metrics["n"] == len(test)
    # it started from the base weights rather than from scratch: still far above chance
    assert result.test_metrics["accuracy"] >= 0.5
    labels = encode_labels([c.label for c in test])
    assert np.bincount(labels).min() > 0 and torch.is_tensor(result.model.head.weight)
