"""Cross-validation: the official protocol trains per fold, saves and resumes; the grouped
protocol never puts a recording on both sides; bad data sets get a one-line reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src import crossval
from src.crossval import CrossvalError, grouped_folds, official, official_folds
from src.datasets import read_dataset, read_us8k
from src.model import TrainConfig
from src.model_card import validation_section

BIN = Path(sys.executable).parent / "urbansound"
QUICK = TrainConfig(epochs=1, patience=1, seed=0)


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> Path:
    """A synthetic set small enough to train once per fold in seconds: folds 1-9 (12 clips a
    class over them, so a recording-grouped validation split fits inside any training side)
    and fold 10."""
    from src import synth

    out = tmp_path_factory.mktemp("cv") / "data"
    synth.generate(out, per_class=12, test_per_class=2, seed=3, progress=False)
    return out


def test_official_runs_each_fold_saves_it_and_resumes(folded, tmp_path, monkeypatch):
    trained: list[str] = []
    real_run_fold = crossval.run_fold

    def counting(data, fold, *args, **kwargs):
        trained.append(fold.name)
        return real_run_fold(data, fold, *args, **kwargs)

    monkeypatch.setattr(crossval, "run_fold", counting)
    first = official(folded, [10, 1], QUICK, cache_dir=tmp_path / "cache", state_dir=tmp_path,
                     progress=False)
    assert trained == ["fold1", "fold10"]
    results = Path(first["results_dir"])
    assert sorted(p.name for p in results.glob("fold*.json")) == ["fold1.json", "fold10.json"]
    clips = read_dataset(folded)
    sizes = {f: sum(c.fold == f for c in clips) for f in (1, 10)}
    assert [r["n"] for r in first["per_fold"]] == [sizes[1], sizes[10]]
    assert first["n"] == sum(sizes.values()) == np.sum(first["confusion_matrix"])
    accs = [r["accuracy"] for r in first["per_fold"]]
    assert first["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert first["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert first["test_folds"] == [1, 10]

    trained.clear()
    second = official(folded, [1, 2, 10], QUICK, cache_dir=tmp_path / "cache",
                      state_dir=tmp_path, progress=False)
    assert trained == ["fold2"]  # finished folds are read back, not trained again
    assert second["run_key"] == first["run_key"]
    by_fold = {r["fold"]: r for r in second["per_fold"]}
    assert by_fold["fold1"]["resumed"] and not by_fold["fold2"].get("resumed")
    assert by_fold["fold10"]["accuracy"] == first["per_fold"][1]["accuracy"]

    trained.clear()  # another recipe is another run: nothing carried over
    other = official(folded, [1], TrainConfig(epochs=2, patience=1, seed=0),
                     cache_dir=tmp_path / "cache", state_dir=tmp_path, progress=False)
    assert trained == ["fold1"] and other["run_key"] != first["run_key"]


def test_crossval_command_prints_one_json_object(folded, isolated_settings):
    proc = subprocess.run(
        [str(BIN), "crossval", "--data", str(folded), "--folds", "2", "--folds", "10",
         "--epochs", "1", "--keep", "last", "--validation", "0", "--time-pool", "meanmax",
         "--residual", "--json"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "URBANSOUND_TORCH_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert {"accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "per_fold",
            "confusion_matrix", "classes", "n"} <= set(out)
    assert [r["fold"] for r in out["per_fold"]] == ["fold2", "fold10"]
    assert out["train_config"]["keep"] == "last" and out["train_config"]["validation"] == 0
    assert out["train_config"]["time_pool"] == "meanmax" and out["train_config"]["residual"]
    assert all(r["n_validation"] == 0 for r in out["per_fold"])  # a refit in every fold
    assert Path(out["results_dir"]).is_relative_to(isolated_settings.state_dir)
    assert "cross-validation" in proc.stderr  # the progress bar, kept off stdout


@pytest.mark.parametrize("case", ["missing_fold", "no_folds", "not_a_dataset"])
def test_bad_input_is_one_line_error(case, folded, tmp_path, isolated_settings):
    data = folded
    args = ["--folds", "11"]  # the set has folds 1-10
    if case == "no_folds":
        data = tmp_path / "plain"
        for clip in read_dataset(folded)[:12]:
            target = data / clip.label / clip.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(clip.path.read_bytes())
        args = []
    elif case == "not_a_dataset":
        data = tmp_path / "nothing"
    proc = subprocess.run([str(BIN), "crossval", "--data", str(data), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    expected = {"missing_fold": "fold(s) [11] have no clips here",
                "no_folds": "have no fold", "not_a_dataset": "no such folder"}[case]
    assert expected in errors[0]


def test_official_folds_need_two_folds(folded):
    only_ten = [c for c in read_dataset(folded) if c.fold == 10]
    with pytest.raises(CrossvalError, match="at least two"):
        official_folds(only_ten)


def test_grouped_folds_keep_recordings_whole_and_test_every_clip_once(us8k):
    clips = read_us8k(us8k, {1, 2})
    folds = grouped_folds(clips, k=5, seed=0)
    groups = np.array([c.group for c in clips])
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(clips)))
    for f in folds:
        assert not set(groups[f.train]) & set(groups[f.test])
        assert len(set(f.train) | set(f.test)) == len(clips)
    labels = {c.label for c in clips}
    for f in folds:  # stratified: every class on both sides of every split
        assert {clips[i].label for i in f.test} == labels


def test_grouped_cv_never_reads_the_excluded_fold(folded, tmp_path):
    summary = crossval.grouped_cv(folded, exclude_folds={10}, k=3, cfg=QUICK,
                                  cache_dir=tmp_path)
    assert summary["n_folds"] == 3
    assert summary["n"] == sum(c.fold != 10 for c in read_dataset(folded))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in summary["per_fold"])
    section = "\n".join(validation_section(summary))  # what the model card prints
    assert f"{summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}" in section
    assert "test fold(s) [10] never read" in section
    for row in summary["per_fold"]:
        assert f"| {row['fold']} | {row['n']} | {row['accuracy']:.3f} |" in section
    # a rerun can say whether it tested the same recordings, on which libraries
    clips = [c for c in read_dataset(folded) if c.fold != 10]
    folds = grouped_folds(clips, k=3, seed=0)
    assert [r["recordings"] for r in summary["per_fold"]] == [
        crossval.recordings_key(clips, f.test) for f in folds]
    assert len({r["recordings"] for r in summary["per_fold"]}) == 3
    import sklearn
    assert all(r["environment"]["scikit-learn"] == sklearn.__version__
               for r in summary["per_fold"])
