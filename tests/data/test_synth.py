"""The synthetic demo set: deterministic, complete, honestly labelled and learnable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from src import synth
from src.cli.data import app
from src.datasets import read_dataset, read_manifest
from src.preprocessing import CLASSES, FeatureConfig, LogMel, load_clip

SR = 22_050


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    a = synth.generate(tmp_path / "a", per_class=2, test_per_class=1, seed=3, progress=False)
    synth.generate(tmp_path / "b", per_class=2, test_per_class=1, seed=3, progress=False)
    synth.generate(tmp_path / "c", per_class=2, test_per_class=1, seed=4, progress=False)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    wavs = [k for k in files_a if k.endswith(".wav")]
    assert len(wavs) == 30 == a["train"] + a["test"]
    files_c = _files(tmp_path / "c")
    assert all(files_a[k] != files_c[k] for k in wavs)


def test_a_clip_does_not_depend_on_how_many_are_made(tmp_path):
    synth.generate(tmp_path / "small", per_class=1, test_per_class=1, seed=0, progress=False)
    synth.generate(tmp_path / "big", per_class=3, test_per_class=2, seed=0, progress=False)
    for rel in ("train/siren/synth-siren-0.wav", "test/gun_shot/synth-gun_shot-test-0.wav"):
        assert (tmp_path / "small" / rel).read_bytes() == (tmp_path / "big" / rel).read_bytes()


def test_every_class_present_and_every_clip_loads(synthetic_data):
    for split, per_class in (("train", 16), ("test", 6)):
        assert sorted(p.name for p in (synthetic_data / split).iterdir() if p.is_dir()) == \
            sorted(CLASSES)
        for label in CLASSES:
            wavs = sorted((synthetic_data / split / label).glob("*.wav"))
            assert len(wavs) == per_class
    config = FeatureConfig()
    for path in sorted(synthetic_data.rglob("*.wav")):
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert 0.5 - 1e-3 <= info.duration <= 4.0 + 1e-3
        raw, _ = sf.read(path)
        assert 1e-3 < np.abs(raw).max() < 1.0  # audible, never clipped
        y = load_clip(path, config)
        assert y.shape == (config.n_samples,) and np.isfinite(y).all()


def test_manifest_marks_clips_synthetic_with_folds_and_groups(synthetic_data):
    clips = read_dataset(synthetic_data)
    assert len(clips) == 10 * (16 + 6)
    assert {c.source for c in clips} == {"synthetic"}
    train = [c for c in clips if c.path.parent.parent.name == "train"]
    test = [c for c in clips if c.path.parent.parent.name == "test"]
    assert {c.fold for c in test} == {10}
    assert {c.fold for c in train} == set(range(1, 10))
    for label in CLASSES:  # round-robin: clip i of a class sits in fold 1 + i % 9
        by_index = {int(c.path.stem.rsplit("-", 1)[1]): c.fold for c in train if c.label == label}
        assert by_index == {i: 1 + i % 9 for i in range(16)}
    groups = [c.group for c in clips]
    assert len(set(groups)) == len(groups)  # one recording per clip, none shared by splits
    rows = read_manifest(synthetic_data / "train")
    assert rows["siren/synth-siren-0.wav"] == {
        "path": "siren/synth-siren-0.wav", "label": "siren", "fold": "1",
        "group": "synth-siren-0", "source": "synthetic",
    }


def test_set_says_it_is_synthetic_and_not_urbansound8k(tmp_path):
    summary = synth.generate(tmp_path, per_class=1, test_per_class=0, seed=0, progress=False)
    note = (tmp_path / "SYNTHETIC.md").read_text()
    assert "NOT UrbanSound8K" in note and "seed: 0" in note
    assert summary["source"] == "synthetic"
    assert summary["train"] == 10 and summary["test"] == 0
    assert 10 * 0.5 <= summary["seconds"] <= 10 * 4.0


def _mean_log_mel(paths: list[Path]) -> np.ndarray:
    config = FeatureConfig()
    waves = torch.from_numpy(np.stack([load_clip(p, config) for p in paths]))
    with torch.no_grad():
        return LogMel(config)(waves)[:, 0].mean(dim=2).numpy()


def test_classes_are_separable_by_a_linear_model_on_mean_log_mel(synthetic_data):
    """Chance is 10 %; a linear model on the average spectrum alone must do far better, or the
    generator makes classes a CNN cannot be expected to tell apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clips = read_dataset(synthetic_data)
    train = [c for c in clips if c.fold != 10]
    test = [c for c in clips if c.fold == 10]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(_mean_log_mel([c.path for c in train]), [c.class_id for c in train])
    accuracy = model.score(_mean_log_mel([c.path for c in test]), [c.class_id for c in test])
    assert accuracy >= 0.5, accuracy


def _spectrum(label: str, index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = synth.GENERATORS[label](np.random.default_rng(index), 2 * SR, SR)
    power = np.abs(np.fft.rfft(y)) ** 2
    return y, np.fft.rfftfreq(len(y), 1 / SR), power


@pytest.mark.parametrize("index", range(5))
def test_class_signatures(index):
    """The acoustic cue each class is built around is really in the signal."""
    _, f, p = _spectrum("engine_idling", index)
    assert p[f < 600].sum() / p.sum() > 0.8  # engines rumble low
    _, f, p = _spectrum("drilling", index)
    assert f[np.argmax(p)] > 1000  # a drill whines high
    y, _, _ = _spectrum("gun_shot", index)
    frames = np.sort((y[: len(y) // 220 * 220].reshape(-1, 220) ** 2).sum(1))[::-1]
    assert frames[: len(frames) // 10].sum() / frames.sum() > 0.7  # shots are brief impulses
    _, f, p = _spectrum("air_conditioner", index)
    assert p[f < 150].sum() / p.sum() > 0.05 and p[f > 1000].sum() / p.sum() > 0.1  # hum + hiss
    y, _, _ = _spectrum("siren", index)
    frames = y[: 2 * SR - 2 * SR % 2048].reshape(-1, 2048) * np.hanning(2048)
    peaks = np.fft.rfftfreq(2048, 1 / SR)[np.abs(np.fft.rfft(frames)).argmax(1)]
    assert peaks.min() > 400 and peaks.max() < 2000 and peaks.max() - peaks.min() > 50  # sweeps


def test_regenerating_replaces_the_old_set(tmp_path):
    synth.generate(tmp_path, per_class=3, test_per_class=2, seed=0, progress=False)
    synth.generate(tmp_path, per_class=1, test_per_class=1, seed=0, progress=False)
    assert len(list(tmp_path.rglob("*.wav"))) == 20
    assert len(read_dataset(tmp_path)) == 20


def test_refuses_to_mix_into_real_data(tmp_path):
    real = tmp_path / "train" / "siren" / "12345-8-0-0.wav"
    real.parent.mkdir(parents=True)
    sf.write(real, np.zeros(SR), SR)
    with pytest.raises(synth.SynthError, match="not synthetic"):
        synth.generate(tmp_path, per_class=1, test_per_class=0, progress=False)
    assert real.is_file() and not list(tmp_path.rglob("synth-*"))


def test_rejects_nonsense_arguments(tmp_path):
    with pytest.raises(synth.SynthError):
        synth.generate(tmp_path, per_class=0, progress=False)
    with pytest.raises(synth.SynthError):
        synth.generate(tmp_path, sample_rate=100, progress=False)


def test_default_set_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    synth.generate(tmp_path, progress=False)
    assert time.perf_counter() - start < 20  # about 3 s on two cores; generous for slow CI


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_synth_then_stats(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["synth", "--out", str(out), "--per-class", "2",
                                 "--test-per-class", "1", "--seed", "7", "-q"])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.stdout and "not UrbanSound8K" in result.stdout
    result = runner.invoke(app, ["stats", "--data", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 30 and report["synthetic"] is True
    assert report["sources"] == {"synthetic": 30}
    assert report["splits"] == {"test": 10, "train": 20}
    assert report["per_class"] == {c: 3 for c in CLASSES}
    assert report["sample_rates"] == {str(SR): 30}
    assert 0.5 <= report["duration_s"]["min"] <= report["duration_s"]["max"] <= 4.0
    result = runner.invoke(app, ["stats", "--data", str(out)])
    assert result.exit_code == 0 and "SYNTHETIC" in result.stdout


def test_cli_synth_defaults_to_the_data_dir_setting(isolated_settings):
    result = runner.invoke(app, ["synth", "--per-class", "1", "--test-per-class", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert len(list((isolated_settings.data_dir / "train").rglob("*.wav"))) == 10


def test_cli_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["stats", "--data", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    (tmp_path / "train" / "siren").mkdir(parents=True)
    (tmp_path / "train" / "siren" / "mine.wav").write_bytes(b"x")
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 1 and "not synthetic" in result.stderr
    assert result.stderr.count("\n") == 1
