"""Checkpoints, train/serve parity and the predictor's contract."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from src.datasets import read_us8k
from src.features import load_waveforms
from src.model import CheckpointError, build_model, load_checkpoint, save_checkpoint
from src.prediction import Predictor, ReducedPrecision, native_bfloat16
from src.preprocessing import CLASSES, FeatureConfig


def test_checkpoint_round_trip_is_self_describing(quick_model, tmp_path):
    path = save_checkpoint(quick_model.checkpoint, tmp_path / "m.pt")
    # weights_only=True: the file is plain data, no pickled code
    raw = torch.load(path, weights_only=True)
    for key in ("version", "parent", "classes", "feature_config", "norm_mean", "norm_std",
                "metrics", "data", "state_dict", "arch", "created_at"):
        assert key in raw
    assert raw["classes"] == list(CLASSES)
    assert raw["data"]["train"]["n"] > 0 and raw["metrics"]["n"] > 0
    # the install that trained it: a rerun elsewhere can tell a library change from a bug
    assert raw["environment"]["torch"] == torch.__version__
    assert raw["environment"]["numpy"] == np.__version__
    assert raw["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    loaded = build_model(load_checkpoint(path))
    x = torch.randn(3, FeatureConfig().n_samples)
    quick_model.model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), quick_model.model(x))


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(quick_model, tmp_path):
    """A run killed or failing while it writes ``--out`` must not leave a truncated file."""
    path = save_checkpoint(quick_model.checkpoint, tmp_path / "m.pt")
    before = path.read_bytes()
    broken = dict(quick_model.checkpoint, extra=lambda: None)  # torch.save cannot pickle it
    with pytest.raises(Exception, match=r"pickle|lambda"):
        save_checkpoint(broken, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["version"] == quick_model.checkpoint["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary left


def test_loading_refuses_pickled_code(tmp_path):
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil.write_bytes(pickle.dumps({"format": "urbansound-ckpt/1", "x": Boom()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_loading_bad_files_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"some": "dict"}, path)  # valid torch file, not ours
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_checkpoint(path)


def test_train_and_serve_compute_identical_features(quick_model, us8k, tmp_path):
    """The cached training waveforms and the served bytes-path give the same model input."""
    clips = read_us8k(us8k, {1})[:6]
    predictor = Predictor(quick_model.checkpoint, optimise=False)
    loaded = load_waveforms(clips, predictor.config, cache_dir=tmp_path, workers=1,
                            progress=False)
    again = load_waveforms(clips, predictor.config, cache_dir=tmp_path, workers=1,
                           progress=False)  # second read comes from the cache
    np.testing.assert_array_equal(loaded.waveforms, again.waveforms)
    model = predictor.model
    with torch.inference_mode():
        train_side = model.features(torch.from_numpy(loaded.waveforms))
        serve_side = model.features(torch.from_numpy(np.stack(
            [predictor.load(c.path.read_bytes()) for c in clips])))
    torch.testing.assert_close(train_side, serve_side, rtol=0, atol=0)


def test_optimised_predictor_agrees_with_eager(quick_model, us8k):
    clips = read_us8k(us8k, {2})[:8]
    fast = Predictor(quick_model.checkpoint, optimise=True, precision="float32")
    slow = Predictor(quick_model.checkpoint, optimise=False)
    assert (fast.precision, slow.precision) == ("float32", "float32")
    waves = np.stack([fast.load(c.path) for c in clips])
    np.testing.assert_allclose(fast.probabilities(waves), slow.probabilities(waves), atol=1e-4)


@pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no native bfloat16 kernels "
                    "(AVX512-BF16/AMX): serving stays in float32 here, see the next test")
def test_bfloat16_serving_answers_as_the_float32_model_does(committed_model, us8k):
    """The served model with its conv body in bfloat16 (``auto`` on this CPU) gives the
    float32 model's answer on real clips, with probabilities within a few points; a batch
    and a single clip get the same answer."""
    clips = [c for fold in (1, 2, 3) for c in read_us8k(us8k, {fold})[:40]]
    served = Predictor(committed_model)
    exact = Predictor(committed_model, precision="float32")
    assert (served.precision, exact.precision) == ("bfloat16", "float32")
    waves = np.stack([served.load(c.path) for c in clips])
    fast, slow = served.probabilities(waves), exact.probabilities(waves)
    assert (fast.argmax(1) == slow.argmax(1)).mean() >= 0.97
    assert np.abs(fast - slow).max() < 0.05
    np.testing.assert_allclose(served.probabilities(waves[:1])[0], fast[0], atol=1e-2)


def test_precision_auto_keeps_float32_without_native_kernels(quick_model, monkeypatch):
    from src import prediction

    monkeypatch.setattr(prediction, "native_bfloat16", lambda: False)
    assert prediction.serving_precision("auto") == "float32"
    assert Predictor(quick_model.checkpoint).precision == "float32"
    assert prediction.serving_precision("bfloat16") == "bfloat16"  # asked for: honoured
    monkeypatch.setattr(prediction, "native_bfloat16", lambda: True)
    assert prediction.serving_precision("auto") == "bfloat16"
    assert Predictor(quick_model.checkpoint, optimise=False).precision == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        prediction.serving_precision("half")


def _no_torchscript(*args, **kwargs):
    raise RuntimeError("TorchScript is gone")


def test_without_torchscript_the_served_precision_runs_eagerly(quick_model, us8k, monkeypatch,
                                                                caplog):
    """TorchScript is deprecated: where tracing fails, the predictor keeps its precision and
    runs the same network eagerly, so its answers are the traced network's (and not the
    slower float32 model's, which is what it fell back to before)."""
    clips = read_us8k(us8k, {2})[:24]
    traced = Predictor(quick_model.checkpoint, precision="bfloat16")
    monkeypatch.setattr(torch.jit, "trace", _no_torchscript)
    with caplog.at_level("WARNING", logger="src.prediction"):
        untraced = Predictor(quick_model.checkpoint, precision="bfloat16")
    assert "TorchScript optimisation failed" in caplog.text
    assert untraced.precision == "bfloat16"
    assert isinstance(untraced._forward, ReducedPrecision)
    waves = np.stack([traced.load(c.path) for c in clips])
    fast, slow = traced.probabilities(waves), untraced.probabilities(waves)
    # bfloat16 rounds differently once tracing has folded batch norm into the convolutions:
    # on fold 3 the served model gives 383 of 387 answers alike, probabilities within 0.015
    assert (fast.argmax(1) == slow.argmax(1)).mean() >= 0.9
    assert np.abs(fast - slow).max() < 0.05


def test_a_bfloat16_body_that_cannot_run_leaves_float32(quick_model, monkeypatch):
    """Neither traced nor eager: the float32 model serves, decided before any request."""
    def broken(self, waveforms):
        raise RuntimeError("no bfloat16 kernels")

    monkeypatch.setattr(torch.jit, "trace", _no_torchscript)
    monkeypatch.setattr(ReducedPrecision, "forward", broken)
    predictor = Predictor(quick_model.checkpoint, precision="bfloat16")
    assert predictor.precision == "float32"
    assert predictor._forward is predictor.model
    assert predictor.probabilities(np.zeros((1, predictor.config.n_samples),
                                            np.float32)).shape == (1, len(CLASSES))


def test_prediction_contract(quick_model, us8k):
    clip = read_us8k(us8k, {1})[0]
    predictor = Predictor(quick_model.checkpoint)
    p = predictor.predict(clip.path.read_bytes(), top_k=3)
    assert p.label in CLASSES and p.class_id == CLASSES.index(p.label)
    assert set(p.probabilities) == set(CLASSES)
    assert abs(sum(p.probabilities.values()) - 1) < 1e-4
    assert p.confidence == max(p.probabilities.values())
    assert next(t["label"] for t in p.top_k) == p.label and len(p.top_k) == 3
    assert p.model_version == "quick-1"
    batch = predictor.predict_many([clip.path, clip.path.read_bytes()])
    assert batch[0].label == batch[1].label == p.label


def test_teachers_see_their_own_standardisation_and_average_probabilities():
    from src.distill import TeacherError, Teachers
    from src.model import AudioCNN

    torch.manual_seed(0)
    config = FeatureConfig(sample_rate=8000, clip_seconds=1.0, fmax=4000.0)
    bands = config.n_mels
    student = AudioCNN(config=config, mean=np.full(bands, -40.0), std=np.full(bands, 10.0))
    a = AudioCNN(config=config, mean=np.full(bands, -30.0), std=np.full(bands, 5.0)).eval()
    b = AudioCNN(config=config).eval()
    wave = torch.randn(3, config.n_samples)
    teachers = Teachers([a, b], student, temperature=2.0)
    with torch.no_grad():
        expected = (torch.softmax(a(wave) / 2, 1) + torch.softmax(b(wave) / 2, 1)) / 2
        got = teachers(student.features(wave))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    teachers.train()
    assert not any(m.training for m in teachers.models)  # BN statistics stay as trained
    other = AudioCNN(config=FeatureConfig(sample_rate=8000, clip_seconds=2.0, fmax=4000.0))
    with pytest.raises(TeacherError, match="other features"):
        Teachers([other], student)
    with pytest.raises(TeacherError, match="at least one"):
        Teachers([], student)


@pytest.mark.parametrize(("frontend", "envelope"),
                         [("logmel+pcen", False), ("logmel+pcen+delta", False),
                          ("logmel+pcen", True)])
def test_multi_channel_front_end_round_trips_and_serves(frontend, envelope, tmp_path):
    """A model whose front end stacks several channels keeps its per-channel statistics
    through a checkpoint (as does its envelope branch), and the traced serving path computes
    what the eager model does."""
    from src.model import AudioCNN, TrainConfig, make_checkpoint, new_model

    torch.manual_seed(0)
    config = FeatureConfig(frontend=frontend)
    waves = torch.randn(6, config.n_samples) * 0.1
    model = new_model(waves, TrainConfig(envelope=envelope), config).eval()
    assert (model.envelope is not None) == envelope
    assert model.standardise.mean.shape == (1, config.n_channels, config.n_mels, 1)
    assert not torch.equal(model.standardise.mean[0, 0], model.standardise.mean[0, 1])
    ckpt = make_checkpoint(model, CLASSES, "fe", None, {}, {})
    loaded = build_model(load_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt")))
    assert loaded.config.frontend == frontend and (loaded.envelope is not None) == envelope
    with torch.inference_mode():
        torch.testing.assert_close(loaded(waves), model(waves))
    predictor = Predictor(ckpt, precision="float32")
    eager = Predictor(ckpt, optimise=False)
    np.testing.assert_allclose(predictor.probabilities(waves[:2].numpy()),
                               eager.probabilities(waves[:2].numpy()), atol=1e-4)
    assert isinstance(model, AudioCNN)


def test_attention_pooling_starts_as_the_mean_and_weights_the_frames_it_scores(tmp_path):
    """An attention head draws the same initial weights as the mean head for every other layer
    and, its scorer at zero, computes exactly what that head does; once the scorer prefers a
    frame the pooled features move to it; the head survives a checkpoint, serves as the eager
    model computes, and a checkpoint from before the option loads as the mean head."""
    from src.model import AudioCNN, make_checkpoint

    x = torch.randn(3, FeatureConfig().n_samples) * 0.1
    torch.manual_seed(0)
    plain = AudioCNN(envelope=True).eval()
    torch.manual_seed(0)
    attn = AudioCNN(envelope=True, time_pool="attention").eval()
    assert attn.time_pool == "attention" and plain.time_pool == "meanmax"
    for key, value in plain.state_dict().items():
        assert torch.equal(value, attn.state_dict()[key]), key
    with torch.inference_mode():
        torch.testing.assert_close(attn(x), plain(x))

    h = torch.zeros(1, 128, 10)
    h[0, :, 7] = 1.0  # one loud frame among silent ones
    with torch.inference_mode():
        assert torch.allclose(attn.pool_time(h), torch.full((1, 128), 0.1))  # the mean
        attn.attention.weight.fill_(0.1)  # scores 12.8 for that frame, 0 for the others
        assert (attn.pool_time(h) > 0.99).all()
        assert not torch.allclose(attn(x), plain(x))

    ckpt = make_checkpoint(attn, CLASSES, "att-1", None, {}, {})
    assert ckpt["arch"]["time_pool"] == "attention"
    loaded = build_model(load_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt")))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), attn(x))
    np.testing.assert_allclose(Predictor(ckpt, precision="float32").probabilities(x[:2].numpy()),
                               Predictor(ckpt, optimise=False).probabilities(x[:2].numpy()),
                               atol=1e-4)
    old = make_checkpoint(plain, CLASSES, "old-1", None, {}, {})
    old["arch"].pop("time_pool")
    assert build_model(old).attention is None
    with pytest.raises(ValueError, match="time_pool"):
        AudioCNN(time_pool="median")


def test_residual_stages_add_their_input_and_survive_a_checkpoint(tmp_path):
    """The residual body draws the plain body's initial weights for a seed (the trial changes
    the skips, nothing else), adds each skipped layer's input to its output, reports its
    widths as the plain one does, serves as the eager model computes in float32 and
    bfloat16's body, and a checkpoint from before the option loads as plain convolutions."""
    from src.model import AudioCNN, Residual, make_checkpoint

    x = torch.randn(3, FeatureConfig().n_samples) * 0.1
    torch.manual_seed(0)
    plain = AudioCNN(envelope=True, time_pool="attention").eval()
    torch.manual_seed(0)
    res = AudioCNN(envelope=True, time_pool="attention", residual=True).eval()
    assert res.residual and not plain.residual
    assert [p.shape for p in res.parameters()] == [p.shape for p in plain.parameters()]
    for a, b in zip(res.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.inference_mode():
        assert not torch.allclose(res(x), plain(x))  # the skips change what the body computes

    block = Residual(4).eval()
    with torch.inference_mode():
        block.conv.weight.zero_()  # no branch: the block passes its (non-negative) input on
        h = torch.rand(2, 4, 5, 6)
        torch.testing.assert_close(block(h), h)
        torch.testing.assert_close(block(-h), torch.zeros_like(h))

    ckpt = make_checkpoint(res, CLASSES, "res-1", None, {}, {})
    assert ckpt["arch"]["residual"] is True and ckpt["arch"]["widths"] == [16, 32, 64, 128]
    loaded = build_model(load_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt")))
    assert loaded.residual
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), res(x))
    eager = Predictor(ckpt, optimise=False).probabilities(x[:2].numpy())
    np.testing.assert_allclose(Predictor(ckpt, precision="float32").probabilities(x[:2].numpy()),
                               eager, atol=1e-4)
    old = make_checkpoint(plain, CLASSES, "old-1", None, {}, {})
    old["arch"].pop("residual")
    assert not build_model(old).residual


def test_a_recipe_reads_back_as_it_trained():
    """``TrainConfig.from_dict`` inverts ``to_dict``; a recipe recorded before attention pooling
    was the default (no ``time_pool``) reads back as the mean head it trained, not as today's
    default, so a soup of an older model fine-tunes it with its own recipe."""
    from dataclasses import replace

    from src.model import TrainConfig

    cfg = replace(TrainConfig(), seed=7, widths=(8, 16, 32, 64))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().time_pool == "attention"
    old = {k: v for k, v in cfg.to_dict().items() if k != "time_pool"}
    assert TrainConfig.from_dict({**old, "retired_option": 1}).time_pool == "meanmax"


def test_checkpoints_from_before_front_ends_load_as_log_mel(committed_model):
    """The log-mel models published before the front end had a name (their feature config
    has no ``frontend`` key) still load, as one-channel log-mel models, and classify."""
    old = committed_model.parent / "20261126T190849Z-3fe485.pt"
    ckpt = load_checkpoint(old)
    assert "frontend" not in ckpt["feature_config"]
    model = build_model(ckpt)
    assert model.config.frontend == "logmel" and model.config.n_channels == 1
    assert model.envelope is None
    with torch.inference_mode():
        assert model(torch.randn(2, model.config.n_samples) * 0.1).shape == (2, len(CLASSES))


def test_the_seed_alone_decides_the_initial_weights():
    """Whatever ran before in the process (here: random draws of another size), a seed gives
    the same initial weights, and another seed other ones."""
    from src.model import TrainConfig, new_model

    config = FeatureConfig(sample_rate=8000, clip_seconds=1.0, fmax=4000.0)
    waves = torch.randn(4, config.n_samples) * 0.1

    def weights(seed: int, draws: int) -> list[torch.Tensor]:
        torch.rand(draws)  # what ran before: the global generator left anywhere
        return list(new_model(waves, TrainConfig(seed=seed), config).state_dict().values())

    first, again, other = weights(3, 1), weights(3, 1000), weights(4, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_serving_does_not_import_scikit_learn(committed_model, us8k):
    """A fresh process that loads the served model and predicts never imports scikit-learn
    (or SciPy under it): they cost every web and worker process ~1 s and ~80 MB."""
    import subprocess
    import sys

    clip = next((us8k / "audio" / "fold1").glob("*.flac"))
    code = ("import sys; from src.prediction import Predictor; "
            f"print(Predictor({str(committed_model)!r}).predict({str(clip)!r}).label); "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.splitlines()
    assert out[0] in CLASSES and out[1] == "[]"
