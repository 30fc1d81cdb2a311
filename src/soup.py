"""Model soups: a trained model fine-tuned a few times, the fine-tunes' weights averaged.

Fine-tunes of one parent stay in one basin of the loss, so the uniform average of their
weights answers much like an ensemble of them, at the cost of one model at serving (Wortsman
et al. 2022, "Model soups"): the latency budget rules out a real ensemble or test-time
augmentation (two clips through the traced model take twice as long as one). Each fine-tune
runs the parent's own recipe (its ``train_config``: augmentation, distillation, EMA) over a
short one-cycle schedule and keeps its final averaged weights, as ``keep="last"`` does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .distill import Teachers
from .model import AudioCNN, Checkpoint, EpochCallback, TrainConfig, build_model, fit

if TYPE_CHECKING:
    from .train import Split


def average_weights(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup: floating tensors (weights and batch-norm statistics) averaged;
    counters (``num_batches_tracked``) taken from the first ingredient."""
    if not state_dicts:
        raise ValueError("A soup needs at least one ingredient.")
    keys = state_dicts[0].keys()
    if any(sd.keys() != keys for sd in state_dicts):
        raise ValueError("Soup ingredients must share one architecture.")
    return {key: (torch.stack([sd[key] for sd in state_dicts]).mean(0)
                  if first.is_floating_point() else first.clone())
            for key, first in state_dicts[0].items()}


def fine_tune_config(parent: Checkpoint, seed: int, epochs: int, lr: float) -> TrainConfig:
    """The parent's recipe with the soup's schedule: ``epochs`` of a one-cycle LR peaking at
    ``lr``, the final EMA weights kept (no early stopping: every ingredient runs as long)."""
    return replace(TrainConfig.from_dict(parent["data"]["train_config"]), epochs=epochs,
                   lr=lr, seed=seed, keep="last", patience=epochs)


def make_soup(parent: Checkpoint, train: Split, validation: Split, seeds: list[int],
              epochs: int, lr: float, teachers: list[Checkpoint] | None = None,
              on_epoch: EpochCallback | None = None) -> tuple[AudioCNN, list[float | None]]:
    """The parent fine-tuned once per seed (batch order and augmentation), then averaged.
    Returns the soup (in eval mode) and each ingredient's validation macro-F1."""
    if not seeds:
        raise ValueError("A soup needs at least one seed.")
    ingredients, scores = [], []
    teacher_models: list[nn.Module] = [build_model(t) for t in teachers or []]  # frozen, shared
    for seed in seeds:
        cfg = fine_tune_config(parent, seed, epochs, lr)
        model = build_model(parent)
        teacher = (Teachers(teacher_models, model, cfg.distill_temperature)
                   if teacher_models else None)
        history = fit(model, train.x, train.y, validation.x, validation.y, cfg,
                      on_epoch=on_epoch, progress=False, teachers=teacher)
        ingredients.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        scores.append(history[-1]["val_f1"])  # None: a refit parent holds nothing out
    model.load_state_dict(average_weights(ingredients))
    return model.eval(), scores


def soup_record(parent: Checkpoint, seeds: list[int], epochs: int, lr: float,
                scores: list[float | None]) -> dict[str, Any]:
    """What the soup's checkpoint keeps of how it was made (``data["soup"]``; the card says it)."""
    return {"parent": parent["version"], "seeds": list(seeds), "epochs": epochs, "lr": lr,
            "ingredient_val_f1": [None if s is None else round(s, 4) for s in scores]}
