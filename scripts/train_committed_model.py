"""Train the committed line: six PCEN teachers, then students distilled from them.

    URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/train_committed_model.py \
        [--teachers FILE x6] [--students FILE ...] [--plain FILE ...] \
        [--validation FILE] [--trained-at COMMIT] [--models models]

Every run trains on folds 1, 2, 4-9 of ../shared/us8k (validation: the same recording-grouped
15% inside them) and is tested on fold 3. One torch thread makes each run repeatable bit for
bit; ``scripts/recipe_trials.py`` writes the same checkpoints under var/trials/ (teachers:
``pcen --seeds 1``, ``pcen --seeds 0``, ``pcen-envelope --seeds 0``, then ``pcen-last``,
``pcen-last`` and ``pcen-envelope-last`` with the same seeds and ``--epochs 60``; students:
``pcen-envelope --teachers T x6``), and the options take finished ones instead of training
them again: two cores train two at a time. Files from var/trials/
get registry names when published; passed again (to render the card again) they are
recognised (``published_runs``) and keep the names they were published under.

1. Teachers (``TEACHERS``): the three PCEN configurations with the best validation macro-F1
   among the five trained while choosing the recipe — log-mel + PCEN seeds 1 and 0, and
   log-mel + PCEN with the envelope branch (the default recipe) seed 0 — each trained twice:
   40 epochs keeping the best validation epoch (``FORTY``) and 60 epochs keeping the final
   weights (``SIXTY``). Students of the six scored higher on validation than students of
   three from one schedule, as the rule declared before their runs required
   (docs/trial-decisions.md, 3 Dec 14:43: mean 0.647 against 0.643 over three seeds; within
   the noise, and lower on fold 3).
2. Students (``--students``; ``STUDENT_SEEDS``): the default recipe at ``FORTY``, distilled
   from the teachers' averaged soft predictions (0.7 of the loss, temperature 2). The choice
   is between seeds 0 and 1; seed 2 (``--spread``) is declared, before it runs, to measure
   the spread only.
3. Chosen: of the students and ``--plain`` runs of the default recipe without teachers, the
   best validation macro-F1 of the weights each kept — never the test fold.
4. Served only through the gate (``beats``): the chosen run replaces the served model only if
   its validation macro-F1 is higher; otherwise the line is published for the record and the
   served model and its card stay (docs/trial-decisions.md, 3 Dec 14:43: the 60-epoch line
   served for an afternoon because the rule of its day never asked).

5. Then the soup (``scripts/soup_trials.py``; docs/trial-decisions.md, 3 Dec 16:59): each
   student fine-tuned three times and the weights averaged (``make``), and the served
   student's soup published through the same gate (``publish``), with its own card.

6. A refit student (``recipe_trials.py pcen-envelope-all``: nothing held out, so no validation
   score for the gate) serves only by a rule declared before it ran: ``--students REFIT.pt
   --refit-verdict TEXT`` serves the first student as the rule named it, with its own card.

The card reports every student seed and plain run (the spread a single figure hides) and, with
``--validation``, the grouped cross-validation summary (``recipe_trials.py --protocol
grouped``) that chose the front end.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from recipe_trials import DEFAULT_EPOCHS, run_label, variant_of  # scripts/, beside this one

from src import registry
from src.model import TrainConfig, is_refit, kept_val_f1, load_checkpoint, save_checkpoint
from src.model_card import render
from src.train import train

ROOT = Path(__file__).resolve().parents[1]
US8K = ROOT.parent / "shared" / "us8k"
#: The two schedules: the recipe's (best validation epoch, early stopping) and the whole
#: 60-epoch schedule with its final averaged weights (higher on the grouped protocol, lower on
#: fold 3 as a served line of its own: docs/trial-decisions.md, 3 Dec)
FORTY: dict[str, Any] = {"epochs": 40, "patience": 12, "keep": "best"}
SIXTY: dict[str, Any] = {"epochs": 60, "patience": 12, "keep": "last"}
#: (TrainConfig changes) of each teacher configuration; the feature config is the default (PCEN)
CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("pcen seed 1", {"envelope": False, "seed": 1}),
    ("pcen seed 0", {"envelope": False, "seed": 0}),
    ("pcen + envelope seed 0", {"seed": 0}),
)
TEACHERS: tuple[tuple[str, dict[str, Any]], ...] = tuple(
    (f"{name}, {schedule['epochs']} epochs", {**changes, **schedule})
    for schedule in (FORTY, SIXTY) for name, changes in CONFIGS)
STUDENT_SEEDS = (0, 1)
REGISTRY_NAME = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")  # registry.new_version_name
REPRODUCE = """git checkout {commit}   # the code that trained these models
URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/train_committed_model.py
# = urbansound train --data ../shared/us8k --test-fold 3 with --no-envelope --seed 1,
#   --no-envelope --seed 0 and --seed 0 (the teachers), each at --epochs 40 --patience 12 and
#   at --epochs 60 --keep last; then --epochs 40 --patience 12 --seed {seed} with --teacher
#   for each of the six
.venv/bin/urbansound evaluate --data ../shared/us8k --folds 3 --json"""
REFIT_REPRODUCE = """git checkout {commit}   # the code that trained the refit students
{teacher_runs}
URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/recipe_trials.py {variant} \\
    --seeds {seeds}{epochs} --teachers {teachers}
.venv/bin/python scripts/train_committed_model.py --teachers {teachers} \\
    --students var/trials/{label}-s{seed}.pt --spread ... --refit-verdict ...
.venv/bin/urbansound evaluate --data ../shared/us8k --folds 3 --json"""


def code_commit() -> str:
    """The commit the runs are trained with, for the card: the same command on other code
    trains other weights (3 Dec: the seed began to set the initial weights)."""
    def git(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    # the code that trains: the package and this script (a README edit changes nothing)
    return head + ("" if git("diff", "--quiet", "HEAD", "--", "src", "scripts").returncode == 0
                   else " (with uncommitted changes to src/ or scripts/)")


def fit(args: argparse.Namespace, changes: dict[str, Any],
        teachers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    # the committed teachers and held-out students predate attention pooling (4 Dec): the
    # mean head, so this script still trains what it committed
    cfg = TrainConfig(**{"time_pool": "meanmax", **changes})
    return train(args.data, {3}, cfg, cache_dir=args.cache, version=registry.new_version_name(),
                 teachers=teachers).checkpoint


def beats(candidate: dict[str, Any], served: dict[str, Any]) -> bool:
    """The gate for a new line: higher validation macro-F1 than the served model, on the same
    test folds (so the same validation split); a tie keeps the status quo. With nothing
    comparable served (a first model, another split) there is nothing to beat."""
    if served["version"] == candidate["version"]:
        return True  # the first model published here, or a rerun for the card only
    if served["metrics"].get("test_folds") != candidate["metrics"].get("test_folds"):
        return True
    return kept_val_f1(candidate) > kept_val_f1(served)


def seed_of(ckpt: dict[str, Any]) -> int:
    return int(ckpt["data"]["train_config"]["seed"])


def identity(created_at: Any, data: dict[str, Any], metrics: dict[str, Any]) -> tuple[Any, ...]:
    """What a run keeps through publishing, which renames it: when it finished, its seed and
    its test scores."""
    return (str(created_at), data.get("train_config", {}).get("seed"), metrics.get("accuracy"),
            metrics.get("macro_f1"), metrics.get("loss"))


def published_runs(models: Path) -> dict[tuple[Any, ...], str]:
    """Every published version by its ``identity``: a var/trials/ run passed again (to render
    the card again) keeps the name it was published under instead of getting a second one."""
    return {identity(v.created_at, v.data, v.metrics): v.version
            for v in registry.list_versions(models) if v.error is None}


def register_name(ckpt: dict[str, Any], renamed: dict[str, str],
                  published: dict[tuple[Any, ...], str]) -> None:
    """A run trained outside the registry gets a registry name (the one it was published
    under before, or a new one), in every place that records it (the test set's scores say
    who earned them; a student names its teachers)."""
    if not REGISTRY_NAME.fullmatch(ckpt["version"]):
        before = published.get(identity(ckpt["created_at"], ckpt["data"], ckpt["metrics"]))
        renamed[ckpt["version"]] = ckpt["version"] = before or registry.new_version_name()
        scores = ckpt["data"].get("test_set", {}).get("scores")
        if scores:
            scores["version"] = ckpt["version"]
    ckpt["data"]["teachers"] = [renamed.get(t, t) for t in ckpt["data"].get("teachers", [])]
    if ckpt.get("parent"):  # a soup names the run it was made from
        ckpt["parent"] = renamed.get(ckpt["parent"], ckpt["parent"])
    if ckpt["data"].get("soup"):
        ckpt["data"]["soup"]["parent"] = ckpt["parent"]
    ckpt["data"]["source_dir"] = "../shared/us8k"


def publish(ckpt: dict[str, Any], models: Path) -> None:
    if not registry.version_path(ckpt["version"], models).is_file():
        path = save_checkpoint(ckpt, ROOT / "var" / "tmp" / f"{ckpt['version']}.pt")
        registry.publish(path, ckpt["version"], models_dir=models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=US8K)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    parser.add_argument("--teachers", type=Path, nargs="*", default=None,
                        help="finished teachers, in TEACHERS order (skip step 1)")
    parser.add_argument("--students", type=Path, nargs="*", default=None,
                        help="finished students of those teachers (skip step 2)")
    parser.add_argument("--spread", type=Path, nargs="*", default=[],
                        help="more students, run after the choice only to measure the spread "
                        "(in the card's seed table, never served)")
    parser.add_argument("--plain", type=Path, nargs="*", default=[],
                        help="finished runs of the default recipe without teachers")
    parser.add_argument("--validation", type=Path, default=None,
                        help="grouped cross-validation summary (JSON) for the card")
    parser.add_argument("--trained-at", default=None, help="commit that trained finished "
                        "--teachers/--students (default: this checkout's)")
    parser.add_argument("--refit-verdict", default=None,
                        help="serve the first --students run, a refit (no validation score for "
                        "the gate), by a declared rule: its verdict, for the card")
    args = parser.parse_args()
    renamed: dict[str, str] = {}
    published = published_runs(args.models)
    if args.teachers:
        teachers = [load_checkpoint(p) for p in args.teachers]
    else:
        teachers = [fit(args, changes) for _, changes in TEACHERS]
    for t in teachers:
        register_name(t, renamed, published)
        publish(t, args.models)  # the students' record of their teachers resolves
    students = ([load_checkpoint(p) for p in args.students] if args.students
                else [fit(args, {**FORTY, "seed": s}, teachers) for s in STUDENT_SEEDS])
    plain = [load_checkpoint(p) for p in args.plain]
    if args.refit_verdict:  # declared before it ran, never chosen: the first student
        served, candidates = students[0], 1
        if not is_refit(served):
            raise SystemExit("error: --refit-verdict serves a refit; the first --students run "
                             "held clips out, so the validation gate judges it")
    else:
        served, candidates = max(students + plain, key=kept_val_f1), len(students)
    students += [load_checkpoint(p) for p in args.spread]
    for s in students:
        register_name(s, renamed, published)
        publish(s, args.models)  # the card's seed table names them all
    publish(served, args.models)
    if args.refit_verdict:
        replaced = serve(served, args.models)
    else:
        serving, replaced = serve_through_gate(served, args.models)
        if not serving:
            return
    validation = json.loads(args.validation.read_text()) if args.validation else None
    if validation:
        validation["data"] = "../shared/us8k"  # as every other path in the card
    write_card(served, students, candidates, plain, validation, args.models, teachers,
               args.trained_at or code_commit(), replaced, args.refit_verdict)
    for run in teachers + students + plain:
        m = run["metrics"]
        print(f"{run['version']} (seed {seed_of(run)}, {len(run['data']['teachers'])} teachers): "
              f"validation macro-F1 {validation_figure(run)}, "
              f"fold-3 accuracy {m['accuracy']:.3f}, "
              f"macro-F1 {m['macro_f1']:.3f}")
    print(f"serving {served['version']}; card: {args.models / 'MODEL_CARD.md'}")


def serve_through_gate(served: dict[str, Any], models: Path
                       ) -> tuple[bool, dict[str, Any] | None]:
    """Activate ``served`` if it ``beats`` the served model (a rerun for the card only finds
    it served already). Returns whether it serves and the metadata of the model it replaced
    (the registry's checked figures, not its weights), or says why it does not serve."""
    incumbent = registry.version_metadata(registry.current(models)[0], models)
    if not beats(served, incumbent):
        print(f"not served: {served['version']} scores validation macro-F1 "
              f"{kept_val_f1(served):.3f}, not above {incumbent['version']}'s "
              f"{kept_val_f1(incumbent):.3f}; it keeps serving, with its card")
        return False, None
    return True, serve(served, models)


def serve(served: dict[str, Any], models: Path) -> dict[str, Any] | None:
    """Activate ``served`` (a rerun for the card only finds it served already); the metadata of
    the model it replaced. Only after a gate, or a declared rule that stands in for one."""
    if registry.current(models)[0] != served["version"]:
        registry.activate(served["version"], models_dir=models)
    previous = (registry.read_pointer(models) or {}).get("previous")
    return registry.version_metadata(previous, models) if previous else None


def validation_figure(ckpt: dict[str, Any]) -> str:
    return "none (a refit)" if is_refit(ckpt) else f"{kept_val_f1(ckpt):.3f}"


def replacement_note(served: dict[str, Any], replaced: dict[str, Any] | None) -> list[str]:
    """What the new line gave up or gained against the model it replaces, on the same clips,
    whichever way it went (nothing when there is no such model on the same test folds)."""
    if not replaced or replaced["metrics"].get("test_folds") != served["metrics"].get("test_folds"):
        return []
    m = replaced["metrics"]
    return [f"It replaces `{replaced['version']}`: test accuracy {m['accuracy']:.3f}, "
            f"macro-F1 {m['macro_f1']:.3f}, validation macro-F1 {validation_figure(replaced)} "
            f"(this model: {served['metrics']['accuracy']:.3f}, "
            f"{served['metrics']['macro_f1']:.3f}, {validation_figure(served)}). The rule that "
            "decided it was written before the line ran: docs/trial-decisions.md."]


def epochs_option(ckpt: dict[str, Any]) -> str:
    """``recipe_trials.py``'s option for the run's schedule, when it is not the default."""
    epochs = ckpt["data"]["train_config"]["epochs"]
    return f" --epochs {epochs}" if epochs != DEFAULT_EPOCHS else ""


def trial_command(ckpt: dict[str, Any]) -> str:
    """The ``recipe_trials.py`` run that trains a published teacher again (its file under
    var/trials/ is what ``--teachers`` then takes, in place of models/VERSION.pt)."""
    # a teacher that is itself a student (born-again, 4 Dec) is trained from its own teachers
    own = " ".join(f"models/{t}.pt" for t in ckpt["data"].get("teachers", []))
    return (f"URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/recipe_trials.py "
            f"{variant_of(ckpt)} --seeds {seed_of(ckpt)}"
            + epochs_option(ckpt)
            + (f" --teachers {own}" if own else "")
            + f"   # the recipe of the teacher {ckpt['version']}")


def seed_row(run: dict[str, Any]) -> dict[str, Any]:
    """One row of the card's seed table."""
    return {"seed": seed_of(run), "version": run["version"],
            "accuracy": run["metrics"]["accuracy"], "macro_f1": run["metrics"]["macro_f1"]}


def refit_reproduce(served: dict[str, Any], students: list[dict[str, Any]],
                    teachers: list[dict[str, Any]], commit: str,
                    validation: dict[str, Any] | None) -> str:
    """The card's Reproduce block for a served refit: its teachers' runs, its own (schedule
    included: the file name and the options are those the run had), the publishing call and,
    with ``validation``, the grouped run the card's summary came from."""
    variant = variant_of(served)
    reproduce = REFIT_REPRODUCE.format(
        commit=commit, seed=seed_of(served), variant=variant, epochs=epochs_option(served),
        label=run_label(variant, served["data"]["train_config"]["epochs"], student=True),
        teacher_runs="\n".join(map(trial_command, teachers)),
        seeds=" ".join(str(seed_of(s)) for s in students),
        teachers=" ".join(f"models/{t}.pt" for t in served["data"]["teachers"]))
    if validation:  # the section's summary: var/trials/{variant}-grouped3-s{seed}.json
        reproduce += (f"\nURBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/recipe_trials.py "
                      f"{variant} --protocol grouped --seeds "
                      f"{validation['train_config']['seed']}   # the validation protocol")
    return reproduce


def write_card(served: dict[str, Any], students: list[dict[str, Any]], candidates: int,
               plain: list[dict[str, Any]], validation: dict[str, Any] | None,
               models: Path, teachers: list[dict[str, Any]], commit: str,
               replaced: dict[str, Any] | None = None, refit_verdict: str | None = None) -> None:
    spread = (f"; {len(students) - candidates} more student(s) ran only to measure "
              "the spread" if len(students) > candidates else "")
    if refit_verdict:
        why = (f"Served: a refit student (the recipe trained on every training-side clip, the "
               f"15% held out for early stopping included, final weights kept), seed "
               f"{seed_of(served)}, declared before it ran{spread}. A refit has no validation "
               f"score for the gate; the rule declared for it (docs/trial-decisions.md) "
               f"decides instead: {refit_verdict}")
        reproduce = refit_reproduce(served, students, teachers, commit, validation)
    else:
        why = (f"Served: the best validation macro-F1 of the weights kept (inside the training "
               f"folds) of {candidates} students and {len(plain)} runs without teachers, chosen "
               f"before looking at the test fold{spread}.")
        reproduce = REPRODUCE.format(seed=seed_of(served), commit=commit)
    notes = [f"{why} With 387 test clips from few recordings, one clip is 0.26 points."]
    notes += replacement_note(served, replaced)
    grand = sorted({g for t in teachers for g in t["data"].get("teachers", [])})
    if grand:  # born-again (docs/trial-decisions.md, 4 Dec 22:44)
        notes.append("Its teachers are themselves students of this recipe (born-again "
                     "distillation, Furlanello et al. 2018), distilled from "
                     + ", ".join(f"`{g}`" for g in grand) + ".")
    if plain:
        runs = ", ".join(f"seed {seed_of(r)} {r['metrics']['accuracy']:.3f}/"
                         f"{r['metrics']['macro_f1']:.3f}" for r in plain)
        notes.append(f"The same recipe without teachers, fold-3 accuracy/macro-F1: {runs}.")
    (models / "MODEL_CARD.md").write_text(
        render(served, reproduce, notes,
               validation=validation,
               seed_runs=sorted((seed_row(s) for s in students), key=lambda r: r["seed"])))


if __name__ == "__main__":
    main()
