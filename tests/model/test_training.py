"""Training actually learns, early stopping restores the best epoch, retrain fine-tunes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.datasets import read_class_folders
from src.model import TrainConfig, fit, kept_val_f1, new_model
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


def test_keep_last_runs_the_whole_schedule_and_keeps_its_final_weights(synthetic_data, tmp_path):
    """The same plateauing run as above: "best" stops early, "last" trains every epoch and
    ends with the weights its last validation scored (not the best epoch's)."""
    from src.model import evaluate_model

    clips = read_class_folders(synthetic_data / "train")[:60]
    split = Split.load(clips, FeatureConfig(), tmp_path, progress=False)
    cfg = TrainConfig(epochs=12, patience=2, lr=3e-2, seed=0, keep="last")
    model = new_model(split.x, cfg, FeatureConfig())
    history = fit(model, split.x, split.y, split.x[:20], split.y[:20], cfg, progress=False)
    assert len(history) == 12
    final = evaluate_model(model, split.x[:20], split.y[:20], tuple(range(10)))
    assert final["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    # and "best" would have kept another epoch's weights: the test tells the two apart
    assert history[-1]["val_f1"] < max(h["val_f1"] for h in history)
    # a run is chosen by the score of the weights it kept, which is the final epoch's here
    ckpt = {"history": history, "data": {"train_config": {"keep": "last"}}}
    assert kept_val_f1(ckpt) == pytest.approx(final["macro_f1"], abs=1e-6)
    ckpt["data"]["train_config"]["keep"] = "best"
    assert kept_val_f1(ckpt) == max(h["val_f1"] for h in history) > final["macro_f1"]


@pytest.mark.parametrize("changes, message", [
    ({"validation": 0.0}, "no best epoch"),  # keep="best" with nothing to pick it on
    ({"validation": 1.0, "keep": "last"}, "validation must be in"),
    ({"validation": -0.1, "keep": "last"}, "validation must be in"),
])
def test_a_recipe_that_cannot_run_is_refused_before_training(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)
    assert TrainConfig(validation=0.0, keep="last").validation == 0.0  # a refit is fine


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


def test_distilled_student_follows_its_teachers_not_the_labels(quick_model, synthetic_data,
                                                              tmp_path):
    """With the whole loss on the soft targets, a student trained on deliberately wrong labels
    still learns what the teacher predicts: the targets really come from the teachers."""
    from src.distill import Teachers
    from src.model import build_model, predict_logits

    teacher = build_model(quick_model.checkpoint)
    config = teacher.config
    train = Split.load(read_class_folders(synthetic_data / "train"), config, tmp_path, False)
    test = Split.load(read_class_folders(synthetic_data / "test"), config, tmp_path, False)
    wrong = (train.y + 1) % 10
    cfg = TrainConfig(epochs=12, patience=12, seed=1, distill_weight=1.0, distill_temperature=1.0)
    student = new_model(train.x, cfg, config)
    fit(student, train.x, wrong, test.x[:0], test.y[:0], cfg, progress=False,
        teachers=Teachers([teacher], student, cfg.distill_temperature))
    said = predict_logits(student, test.x).argmax(1).numpy()
    taught = predict_logits(teacher, test.x).argmax(1).numpy()
    assert (said == taught).mean() >= 0.5  # chance agreement is ~0.1
    assert (said == (test.y + 1) % 10).mean() <= 0.2


def test_band_head_round_trips_and_older_checkpoints_load_with_the_mean_head(quick_model):
    """The head is part of the checkpoint's ``arch``; one written before it existed (no
    ``freq_pool``) must still load, as the mean head it was trained with."""
    from src.model import ENVELOPE_DIM, AudioCNN, build_model, make_checkpoint
    from src.preprocessing import CLASSES

    x = torch.randn(2, FeatureConfig().n_samples)
    banded = AudioCNN(freq_pool="bands").eval()
    ckpt = make_checkpoint(banded, CLASSES, "b-1", None, {}, {})
    assert ckpt["arch"]["freq_pool"] == "bands"
    with torch.inference_mode():
        assert torch.equal(build_model(ckpt)(x), banded(x))
    old = dict(quick_model.checkpoint, arch={k: v for k, v in
                                             quick_model.checkpoint["arch"].items()
                                             if k != "freq_pool"})
    model = build_model(old)
    envelope = ENVELOPE_DIM if old["arch"].get("envelope") else 0  # the optional branch
    assert model.freq_pool == "mean"
    assert model.head.in_features == 2 * old["arch"]["widths"][-1] + envelope


def test_average_weights_means_floats_and_keeps_counters():
    from src.soup import average_weights

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    soup = average_weights([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0]))
    assert int(soup["n"]) == 5 and soup["n"].dtype == a["n"].dtype
    with pytest.raises(ValueError, match="architecture"):
        average_weights([a, {"w": b["w"]}])
    with pytest.raises(ValueError, match="at least one"):
        average_weights([])


def test_a_soup_is_the_average_of_its_parents_fine_tunes(quick_model, synthetic_data, tmp_path):
    """Each ingredient is a seeded fine-tune of the parent (so it can be made again alone),
    and the soup's weights are exactly their average: it answers from the parent's basin."""
    from src.model import build_model, evaluate_model
    from src.soup import make_soup

    parent = quick_model.checkpoint
    config = build_model(parent).config
    train = Split.load(read_class_folders(synthetic_data / "train"), config, tmp_path, False)
    test = Split.load(read_class_folders(synthetic_data / "test"), config, tmp_path, False)
    soup, scores = make_soup(parent, train, test, [1, 2], epochs=1, lr=1e-3)
    alone = [make_soup(parent, train, test, [seed], epochs=1, lr=1e-3) for seed in (1, 2)]
    assert scores == pytest.approx([s for _, (s,) in alone])
    one, two = (m.state_dict() for m, _ in alone)
    assert not torch.allclose(one["head.weight"], two["head.weight"])  # the seeds differ
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, (one[key] + two[key]) / 2, atol=1e-6), key
    assert not soup.training
    assert evaluate_model(soup, test.x, test.y, tuple(range(10)))["accuracy"] >= 0.5
    # a refit parent holds nothing out: its soup's ingredients have no score, not a zero
    nothing = Split([], test.x[:0], test.y[:0])
    assert make_soup(parent, train, nothing, [1], epochs=1, lr=1e-3)[1] == [None]


def test_a_per_clip_teacher_reaches_each_clip_through_mixup(synthetic_data, tmp_path):
    """Per-clip soft targets (the BirdNET probe's) are the targets of their own clips, mixed
    as their clips are: a student taught by a teacher that knows nothing (a fresh network) and
    per-clip targets that name a shifted class learns the shifted class on clips it never saw;
    misaligned rows would teach noise."""
    from src.distill import Teachers
    from src.model import predict_logits

    config = FeatureConfig()
    train = Split.load(read_class_folders(synthetic_data / "train"), config, tmp_path, False)
    test = Split.load(read_class_folders(synthetic_data / "test"), config, tmp_path, False)
    cfg = TrainConfig(epochs=12, patience=12, seed=1, distill_weight=1.0, distill_temperature=1.0,
                      mixup_prob=1.0)
    know_nothing = new_model(train.x, TrainConfig(seed=7), config)
    shifted = np.eye(10, dtype=np.float32)[(train.y + 2) % 10]
    student = new_model(train.x, cfg, config)
    fit(student, train.x, (train.y + 1) % 10, test.x[:0], test.y[:0], cfg, progress=False,
        teachers=Teachers([know_nothing], student, cfg.distill_temperature), clip_probs=shifted)
    said = predict_logits(student, test.x).argmax(1).numpy()
    assert (said == (test.y + 2) % 10).mean() >= 0.5  # chance is 0.1
    with pytest.raises(ValueError, match="one row per clip"):
        fit(student, train.x, train.y, test.x[:0], test.y[:0], cfg, progress=False,
            teachers=Teachers([know_nothing], student, 1.0), clip_probs=shifted[:-1])


def test_cross_fitted_probabilities_never_come_from_a_probe_that_saw_the_recording():
    """Labels drawn at random per recording and features that identify the recording: a probe
    that saw a clip's recording names its label, one that did not can only guess."""
    from src.distill import probe_probabilities

    rng = np.random.default_rng(0)
    recordings = np.repeat(np.arange(60), 5)
    labels = rng.integers(0, 10, 60)[recordings]
    features = (rng.normal(size=(60, 32))[recordings]
                + 0.01 * rng.normal(size=(len(recordings), 32)))
    probs = probe_probabilities(features, labels, recordings, 10, temperature=1.0, c=10.0)
    assert probs.shape == (300, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() < 0.3
    from sklearn.linear_model import LogisticRegression

    in_sample = LogisticRegression(C=10.0, max_iter=3000).fit(features, labels)
    assert (in_sample.predict(features) == labels).mean() > 0.9
    # folds=0: one probe fitted on every clip it teaches, as the CNN teachers are
    taught = probe_probabilities(features, labels, recordings, 10, temperature=1.0, c=10.0,
                                 folds=0)
    assert (taught.argmax(1) == labels).mean() > 0.9
