"""scripts/recipe_trials.py names the run that trains a checkpoint (``variant_of``): the model
card's Reproduce block prints it, so a wrong name sends a reader to train another recipe."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trials() -> ModuleType:
    return load_script("recipe_trials")


def checkpoint(trials, name: str, seed: int = 3, epochs: int = 40,
               drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's record of the recipe ``name`` trains, less the fields in ``drop`` (what
    a checkpoint written before those options existed lacks)."""
    cfg, config = trials.configs(name, seed, epochs)
    recorded = {k: v for k, v in cfg.to_dict().items() if k not in drop}
    return {"version": f"{name}-s{seed}", "feature_config": config.to_dict(),
            "data": {"train_config": recorded}}


@pytest.mark.parametrize("name", ["pcen-envelope-attention-all", "pcen-attention",
                                  "pcen-envelope-attention-last", "pcen-envelope-all",
                                  "pcen-envelope-attention-residual-all"])
def test_a_checkpoint_names_the_variant_that_trained_it(trials, name):
    assert trials.variant_of(checkpoint(trials, name)) == name


def test_an_older_checkpoint_names_the_oldest_variant_that_agrees(trials):
    # written before time_pool, keep, validation, residual and speed existed: the mean head,
    # the best epoch, 15% held out; "pcen-attention" agrees on every field it has, too
    old = checkpoint(trials, "pcen", seed=1,
                     drop=("time_pool", "keep", "validation", "residual", "speed"))
    assert trials.variant_of(old) == "pcen"


def test_the_seed_and_schedule_come_from_the_checkpoint(trials):
    long = checkpoint(trials, "pcen-envelope-last", seed=2, epochs=60)
    assert trials.variant_of(long) == "pcen-envelope-last"


def test_a_recipe_no_variant_trains_is_an_error_not_a_guess(trials):
    other = checkpoint(trials, "pcen-envelope-attention-all")
    other["data"]["train_config"]["lr"] = 0.01
    with pytest.raises(ValueError, match="no variant"):
        trials.variant_of(other)


@pytest.fixture(scope="module")
def committed() -> ModuleType:
    """scripts/train_committed_model.py, which imports ``recipe_trials`` as its neighbour."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPTS))
        return load_script("train_committed_model")


def test_a_teacher_that_is_a_student_is_trained_again_from_its_own_teachers(trials, committed):
    # born-again (4 Dec): the served student's teachers are students of the committed ones
    teacher = checkpoint(trials, "pcen-envelope-attention-last", seed=1)
    teacher["data"]["teachers"] = ["20261202T214819Z-78aac3", "20261202T214819Z-e7db9d"]
    line = committed.trial_command(teacher)
    assert ("recipe_trials.py pcen-envelope-attention-last --seeds 1 --teachers "
            "models/20261202T214819Z-78aac3.pt models/20261202T214819Z-e7db9d.pt") in line
    plain = checkpoint(trials, "pcen-attention", seed=0)
    assert "--teachers" not in committed.trial_command(plain)


def test_a_longer_schedule_is_named_in_the_commands_that_train_it_again(trials, committed):
    # 5 Dec: the 80-epoch students; the default schedule stays implicit
    teacher = checkpoint(trials, "pcen-envelope", seed=0)
    teacher["data"]["teachers"] = []
    assert "--epochs" not in committed.trial_command(teacher)
    run = checkpoint(trials, "pcen-envelope-attention-all", seed=4, epochs=80)
    run["data"]["teachers"] = ["20261202T214819Z-78aac3"]
    assert committed.epochs_option(run) == " --epochs 80"
    assert "--seeds 4 --epochs 80" in committed.trial_command(run)
    block = committed.refit_reproduce(run, [run], [teacher], "abc1234", None)
    assert ("recipe_trials.py pcen-envelope-attention-all \\\n    --seeds 4 --epochs 80 "
            "--teachers models/20261202T214819Z-78aac3.pt") in block
    # the file that run wrote, which the publishing call takes
    assert "--students var/trials/pcen-envelope-attention-all-student-e80-s4.pt" in block
    at_forty = checkpoint(trials, "pcen-envelope-attention-all", seed=3)
    at_forty["data"]["teachers"] = ["20261202T214819Z-78aac3"]
    block = committed.refit_reproduce(at_forty, [at_forty], [teacher], "abc1234", None)
    assert "--epochs" not in block
    assert "var/trials/pcen-envelope-attention-all-student-s3.pt" in block
