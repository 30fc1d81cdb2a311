"""The command-line contract of DESIGN.md: JSON shapes, one-line errors, exit codes.

Run through the installed ``urbansound`` entry point in a subprocess, as scripts use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src import registry
from src.model import save_checkpoint
from src.model_card import render

BIN = Path(sys.executable).parent / "urbansound"


def run(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture(scope="module")
def model_file(quick_model, tmp_path_factory) -> Path:
    return save_checkpoint(quick_model.checkpoint, tmp_path_factory.mktemp("m") / "quick.pt")


def assert_one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr  # warnings may precede it; one reason, one line
    assert "Traceback" not in proc.stderr


def test_predict_json_contract(model_file, us8k):
    files = sorted((us8k / "audio" / "fold1").glob("*.flac"))[:3]
    proc = run("predict", "--model", str(model_file), "--json", *map(str, files))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 3
    for row, f in zip(rows, files, strict=True):
        assert row["file"] == str(f)
        assert {"label", "class_id", "confidence", "probabilities", "model_version"} <= set(row)
        assert row["model_version"] == "quick-1"
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4


def test_inference_precision_setting(model_file, us8k):
    """The setting reaches the CLI's predictor; a value it does not know is one clear line."""
    f = str(next((us8k / "audio" / "fold1").glob("*.flac")))
    bad = run("predict", "--model", str(model_file), f,
              env={"URBANSOUND_INFERENCE_PRECISION": "half"})
    assert_one_line_error(bad)
    assert "inference_precision" in bad.stderr and "bfloat16" in bad.stderr
    rows = [json.loads(run("predict", "--model", str(model_file), "--json", f,
                           env={"URBANSOUND_INFERENCE_PRECISION": p}).stdout)
            for p in ("float32", "auto")]
    assert rows[0]["label"] == rows[1]["label"]


def test_predict_reports_bad_files_and_keeps_going(model_file, us8k, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    good = next((us8k / "audio" / "fold1").glob("*.flac"))
    proc = run("predict", "--model", str(model_file), "--json", str(bad), str(good))
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 1  # the good file was still labelled
    assert_one_line_error(proc)
    assert "bad.wav" in proc.stderr


def test_evaluate_json_contract(model_file, synthetic_data):
    proc = run("evaluate", "--model", str(model_file), "--data", str(synthetic_data / "test"),
               "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    for key in ("n", "accuracy", "macro_f1", "loss", "precision", "recall", "per_class",
                "confusion_matrix"):
        assert key in m
    assert m["n"] == 60 and len(m["confusion_matrix"]) == 10
    assert sum(map(sum, m["confusion_matrix"])) == m["n"]


@pytest.mark.parametrize("args", [
    ("predict", "--model", "/nonexistent/model.pt", "x.wav"),
    ("evaluate", "--data", "/nonexistent/folder", "--model", "/nonexistent/model.pt"),
    ("train", "--data", "/nonexistent/folder", "--epochs", "1"),
    ("models", "activate", "no-such-version"),
])
def test_errors_are_one_line(args, tmp_path):
    env = {"URBANSOUND_STATE_DIR": str(tmp_path / "var"),
           "URBANSOUND_MODELS_DIR": str(tmp_path / "models")}
    assert_one_line_error(run(*args, env=env))


def test_the_library_refuses_a_birdnet_teacher_without_cnn_teachers() -> None:
    """As the CLI does: a run that trained without the probe must not say it had one."""
    import numpy as np
    import torch

    from src.model import TrainConfig
    from src.preprocessing import FeatureConfig
    from src.train import Split, fit_and_test

    empty = Split([], torch.zeros(0, 1), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="pass teachers"):
        fit_and_test(empty, empty, empty, TrainConfig(birdnet_teacher=True), FeatureConfig())


def test_train_registers_and_serves_a_new_version(synthetic_data, tmp_path):
    env = {"URBANSOUND_STATE_DIR": str(tmp_path / "var"),
           "URBANSOUND_MODELS_DIR": str(tmp_path / "models")}
    proc = run("train", "--data", str(synthetic_data), "--epochs", "2", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "macro-F1" in proc.stdout
    version, path = registry.current(tmp_path / "models")
    assert path.is_file() and version in proc.stdout
    assert (tmp_path / "var" / "reports" / version / "confusion_matrix.png").is_file()

    # a registered version can teach the next one (distillation), by name
    proc = run("train", "--data", str(synthetic_data), "--epochs", "2", "--quiet",
               "--teacher", version, env=env)
    assert proc.returncode == 0, proc.stderr
    student, student_path = registry.current(tmp_path / "models")
    assert student != version
    from src.model import is_refit, load_checkpoint

    assert load_checkpoint(student_path)["data"]["teachers"] == [version]
    missing = run("train", "--data", str(synthetic_data), "--epochs", "1", "--quiet",
                  "--teacher", "no-such-version", env=env)
    assert_one_line_error(missing)
    assert "no-such-version" in missing.stderr
    # BirdNET's probe teaches beside CNN teachers, never alone, and the card says so
    alone = run("train", "--data", str(synthetic_data), "--epochs", "1", "--birdnet-teacher",
                env=env)
    assert_one_line_error(alone)
    assert "add --teacher" in alone.stderr
    proc = run("train", "--data", str(synthetic_data), "--epochs", "1", "--quiet",
               "--teacher", version, "--birdnet-teacher", env=env)
    assert proc.returncode == 0, proc.stderr
    taught = load_checkpoint(registry.current(tmp_path / "models")[1])
    assert taught["data"]["train_config"]["birdnet_teacher"]
    assert "CC BY-NC-SA 4.0" in render(taught)
    teacher = load_checkpoint(path)
    assert teacher["feature_config"]["frontend"] == "logmel+pcen" and teacher["arch"]["envelope"]

    # the recipe's choices are flags; a teacher must share the student's features
    assert teacher["data"]["train_config"]["keep"] == "best"
    proc = run("train", "--data", str(synthetic_data), "--epochs", "1", "--quiet",
               "--frontend", "logmel", "--no-envelope", "--keep", "last", "--validation", "0",
               "--time-pool", "meanmax", "--residual", env=env)
    assert proc.returncode == 0, proc.stderr
    plain = load_checkpoint(registry.current(tmp_path / "models")[1])
    assert plain["feature_config"]["frontend"] == "logmel" and not plain["arch"]["envelope"]
    assert plain["arch"]["time_pool"] == "meanmax" and plain["arch"]["residual"]
    assert teacher["arch"]["time_pool"] == "attention" and not teacher["arch"]["residual"]
    assert plain["data"]["train_config"]["keep"] == "last"
    # a refit trains on the clips the others held out for validation, and validates on none
    assert plain["data"]["validation"]["n"] == 0 and plain["history"][-1]["val_f1"] is None
    assert plain["data"]["train"]["n"] == (teacher["data"]["train"]["n"]
                                           + teacher["data"]["validation"]["n"])
    assert "none held out" in render(plain) and is_refit(plain) and not is_refit(teacher)
    # refused before anything is written: not even the default demo set when --data is unset
    empty = tmp_path / "no-data-yet"
    no_epoch_to_pick = run("train", "--validation", "0",
                           env={**env, "URBANSOUND_DATA_DIR": str(empty)})
    assert_one_line_error(no_epoch_to_pick)
    assert "--keep last" in no_epoch_to_pick.stderr and not empty.exists()
    mismatch = run("train", "--data", str(synthetic_data), "--epochs", "1", "--quiet",
                   "--frontend", "logmel", "--teacher", version, env=env)
    assert_one_line_error(mismatch)
    assert "other features" in mismatch.stderr
    assert_one_line_error(run("train", "--data", str(synthetic_data), "--frontend", "mfcc",
                              env=env))
    wrong_keep = run("train", "--data", str(synthetic_data), "--keep", "first", env=env)
    assert_one_line_error(wrong_keep)
    assert "--keep must be one of best, last" in wrong_keep.stderr
    wrong_pool = run("train", "--data", str(synthetic_data), "--time-pool", "median", env=env)
    assert_one_line_error(wrong_pool)
    assert "--time-pool must be one of meanmax, attention" in wrong_pool.stderr


def test_a_closed_pipe_ends_the_command_at_once_and_quietly(model_file, us8k):
    """``urbansound predict --json FILE... | head -1``: once the reader is gone the command
    stops (no work on the remaining files), prints nothing and exits 141 (128 + SIGPIPE)."""
    import time

    clip = str(next((us8k / "audio" / "fold1").glob("*.flac")))
    files = [clip] * 3000  # labelling all of them would take far longer than the limit below
    proc = subprocess.Popen([str(BIN), "predict", "--model", str(model_file), "--json", *files],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()  # like head -1: one line, then close
        assert json.loads(first)["file"] == clip
        proc.stdout.close()
        closed = time.monotonic()
        stderr = proc.stderr.read().decode()
        proc.wait(timeout=60)
        elapsed = time.monotonic() - closed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 141, stderr
    assert stderr == "", stderr  # no "error: [Errno 32] Broken pipe", no "Exception ignored"
    assert elapsed < 5, f"went on working {elapsed:.1f} s after the reader closed"


def test_plain_predict_says_when_it_heard_only_the_start(model_file, us8k, tmp_path):
    """A 12-s file is labelled from its first clip: the plain answer says so and names the
    command that hears it all; a clip that fits says nothing of the kind."""
    import numpy as np
    import soundfile as sf

    clip = next(iter(sorted(us8k.glob("audio/fold1/*"))))
    y, sr = sf.read(clip)
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([y] * 3), sr)
    proc = run("predict", "--model", str(model_file), str(long), str(clip))
    assert proc.returncode == 0, proc.stderr
    long_line, clip_line = proc.stdout.strip().splitlines()
    duration = len(y) * 3 / sr
    assert f"of {duration:.1f} s" in long_line and "urbansound analyze" in long_line
    assert "analyze" not in clip_line
