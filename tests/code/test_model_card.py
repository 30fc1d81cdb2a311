"""The model card is generated from the checkpoint, so it must say what the checkpoint says."""

from __future__ import annotations

import copy

from src.model import load_checkpoint
from src.model_card import render, top_confusions


def test_committed_card_matches_the_served_checkpoint(committed_model):
    ckpt = load_checkpoint(committed_model)
    card = (committed_model.parent / "MODEL_CARD.md").read_text()
    m = ckpt["metrics"]
    assert card.startswith(f"# Model card — `{ckpt['version']}`")
    cm = m["confusion_matrix"]
    right, n = sum(row[i] for i, row in enumerate(cm)), sum(map(sum, cm))
    assert abs(right / n - m["accuracy"]) < 1e-9  # the count behind the rounded figure
    assert (f"accuracy **{m['accuracy']:.3f}** ({right} of {n} clips), "
            f"macro-F1 **{m['macro_f1']:.3f}**") in card
    for name, s in m["per_class"].items():
        assert f"| {name} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} |" in card
    for teacher in ckpt["data"].get("teachers", []):
        assert f"`{teacher}`" in card
    if "soup" in ckpt["data"]:  # a soup names the model it was made from
        assert f"fine-tunes of `{ckpt['data']['soup']['parent']}`" in card


def test_card_names_teachers_and_the_largest_confusions(quick_model):
    ckpt = copy.deepcopy(quick_model.checkpoint)
    assert "Distilled" not in render(ckpt)
    ckpt["data"]["teachers"] = ["t-1", "t-2"]
    ckpt["data"]["train_config"].update(distill_weight=0.7, distill_temperature=2.0)
    card = render(ckpt, "urbansound train ...")
    assert "ensemble of 2 models" in card and "`t-1`, `t-2`" in card
    assert "0.7 of the loss" in card and "temperature 2.0" in card
    true, predicted, n, _share = top_confusions(ckpt["metrics"], k=1)[0]
    cm = ckpt["metrics"]["confusion_matrix"]
    assert n == max(cm[i][j] for i in range(10) for j in range(10) if i != j)
    assert f"{true} → {predicted} ({n}," in card and "urbansound train ..." in card
    assert "BirdNET" not in card


def test_card_credits_the_birdnet_teacher_and_carries_its_licence(quick_model):
    """A network distilled from BirdNET says so, with the weights' licence (NC-SA): its
    users inherit the terms."""
    ckpt = copy.deepcopy(quick_model.checkpoint)
    ckpt["data"]["teachers"] = ["t-1"]
    ckpt["data"]["train_config"].update(distill_weight=0.7, distill_temperature=2.0,
                                        birdnet_teacher=True)
    card = render(ckpt)
    assert "mean of their averaged soft targets and a second teacher's" in card
    assert "linear probe on BirdNET V2.4" in card and "CC BY-NC-SA 4.0" in card


def test_card_says_which_front_end_and_head_the_model_has(quick_model):
    ckpt = copy.deepcopy(quick_model.checkpoint)
    ckpt["feature_config"]["frontend"] = "logmel"
    ckpt["arch"]["envelope"] = False
    ckpt["arch"]["time_pool"] = "meanmax"
    plain = render(ckpt)
    assert "64-band log-mel spectrograms" in plain and "PCEN" not in plain
    assert "mean and spread" not in plain
    assert "attention" not in plain
    ckpt["feature_config"]["frontend"] = "logmel+pcen"
    ckpt["arch"]["envelope"] = True
    card = render(ckpt)
    assert "log-mel and PCEN (per-channel energy normalised) spectrograms" in card
    assert "the head also sees each band's mean and spread over time" in card
    assert "attention" not in card
    assert "residual" not in card
    ckpt["arch"]["time_pool"] = "attention"
    assert "frames are averaged with learned attention weights" in render(ckpt)
    ckpt["arch"]["residual"] = True
    assert "second convolutions are residual" in render(ckpt)


def test_card_says_a_soup_is_one(quick_model):
    ckpt = copy.deepcopy(quick_model.checkpoint)
    assert "A soup" not in render(ckpt)
    ckpt["data"]["soup"] = {"parent": "p-1", "seeds": [10, 11, 12], "epochs": 8, "lr": 0.001,
                            "ingredient_val_f1": [0.64, 0.63, 0.67]}
    card = render(ckpt)
    assert "A soup: the weights of 3 fine-tunes of `p-1` (seeds 10, 11, 12; 8 epochs" in card
    assert "peaking at 0.001" in card and "validation macro-F1 0.640, 0.630, 0.670" in card
    # a soup of a refit has no held-out clips: the card says so rather than print zeros
    ckpt["data"]["soup"]["ingredient_val_f1"] = [None, None, None]
    card = render(ckpt)
    assert "no validation: a refit" in card and "validation macro-F1 0.000" not in card


def test_card_reports_the_validation_protocol_with_its_spread_and_folds(quick_model):
    """The issue's card: the recipe's grouped cross-validation figures with their spread, one
    row per fold, the seed, and which folds it used (the test fold never read)."""
    summary = {"protocol": "grouped 3-fold", "data": "../shared/us8k", "excluded_folds": [3],
               "n": 30, "accuracy_mean": 0.6, "accuracy_std": 0.1, "macro_f1_mean": 0.55,
               "macro_f1_std": 0.05, "train_config": {"seed": 2},
               "per_fold": [{"fold": f"group{i}", "n": 10, "accuracy": 0.5 + i / 20,
                             "macro_f1": 0.5 + i / 40} for i in (1, 2, 3)]}
    card = render(quick_model.checkpoint, validation=summary)
    assert "## Validation protocol (grouped 3-fold)" in card
    assert "each fold trains its own, seed 2) on `../shared/us8k`" in card
    assert "test fold(s) [3] never read" in card and "30 clips scored in all" in card
    assert "accuracy **0.600 ± 0.100**, macro-F1 **0.550 ± 0.050**" in card
    assert "| group2 | 10 | 0.600 | 0.550 |" in card
    assert "Validation protocol" not in render(quick_model.checkpoint)
