"""Model soups of trained students (``src/soup.py``): make them, score them, publish one.

    URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/soup_trials.py make PARENT.pt \
        --teachers T1.pt T2.pt T3.pt [--seeds 10 11 12] [--epochs 8] [--lr 1e-3]
    .venv/bin/python scripts/soup_trials.py publish SOUP.pt [--spread SOUP.pt ...] \
        --parents-trained-at COMMIT | --parent PARENT.pt --refit-verdict TEXT

``make`` fine-tunes the parent once per seed with its own recipe over a short schedule and
averages the fine-tunes; the soup lands in var/trials/ and one JSON line with its validation
macro-F1 (what the rules in docs/trial-decisions.md read) and fold-3 scores goes to
var/trials/results.jsonl. Trained on folds 1, 2, 4-9 of ../shared/us8k, tested on fold 3, like
``recipe_trials.py``.

``publish`` gives the soups registry names, puts them in models/ and serves SOUP only through
the gate (``train_committed_model.beats``: higher validation macro-F1 than the served model),
with its card; ``--spread`` soups (the other parents') fill the card's seed table. A soup of a
refit (``recipe_trials.py pcen-envelope-all``: nothing held out) has no validation score for the
gate; it serves only with ``--refit-verdict``, the verdict of the rule declared for it, and
``--parent`` publishes its parent run beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import mean
from typing import Any

from recipe_trials import OUT, US8K, log_epoch, record
from train_committed_model import (
    REGISTRY_NAME,
    code_commit,
    publish,
    published_runs,
    register_name,
    replacement_note,
    seed_row,
    serve,
    serve_through_gate,
    validation_figure,
)

from src.model import is_refit

ROOT = Path(__file__).resolve().parents[1]
REPRODUCE = """git checkout {parents_commit}   # the code that trained the parents
URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/train_committed_model.py   # at that commit
git checkout {commit}   # the code that made the soups
URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/soup_trials.py make PARENT.pt \\
    --teachers {teachers} --seeds {seeds} --epochs {epochs} --lr {lr}
#   for each parent: {parents}
.venv/bin/python scripts/soup_trials.py publish SOUP.pt --spread ...
.venv/bin/urbansound evaluate --data ../shared/us8k --folds 3 --json"""
REFIT_REPRODUCE = """git checkout {commit}   # the code that trained the refit and made its soup
URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/recipe_trials.py pcen-envelope-all \\
    --seeds {seed} --teachers {teachers}
URBANSOUND_TORCH_THREADS=1 .venv/bin/python scripts/soup_trials.py make \\
    var/trials/pcen-envelope-all-student-s{seed}.pt --seeds {seeds} --epochs {epochs} --lr {lr}
.venv/bin/python scripts/soup_trials.py publish var/trials/SOUP.pt \\
    --parent var/trials/pcen-envelope-all-student-s{seed}.pt --refit-verdict ...
.venv/bin/urbansound evaluate --data ../shared/us8k --folds 3 --json"""


def teachers_of(parent: dict[str, Any], given: list[Path]) -> list[dict[str, Any]]:
    """The fine-tunes distil from the teachers the parent learnt from: the files given, else
    the parent's own teachers from models/. Without them a distilled parent would be
    fine-tuned on the labels alone, quietly another recipe, so a missing one is an error."""
    from src import registry
    from src.model import load_checkpoint

    paths = given or [registry.version_path(t, ROOT / "models")
                      for t in parent["data"].get("teachers", [])]
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: teacher(s) not found: {', '.join(missing)} (pass --teachers)")
    return [load_checkpoint(p) for p in paths]


def make(args: argparse.Namespace) -> None:
    from src.model import (
        TrainConfig,
        evaluate_model,
        load_checkpoint,
        make_checkpoint,
        save_checkpoint,
    )
    from src.preprocessing import CLASSES, FeatureConfig
    from src.soup import make_soup, soup_record
    from src.testset import with_scores
    from src.train import Split, set_threads, split_clips

    set_threads()
    start = time.time()
    parent = load_checkpoint(args.parent)
    config = FeatureConfig.from_dict(parent["feature_config"])
    recipe = parent["data"]["train_config"]
    # the parent's own split: a refit parent (validation 0) is souped on every training clip
    splits = split_clips(US8K, {3}, recipe.get("validation", TrainConfig.validation),
                         recipe["split_seed"])
    tr, va, te = (Split.load(c, config, args.cache, False) for c in splits[:3])
    model, scores = make_soup(parent, tr, va, args.seeds, args.epochs, args.lr,
                              teachers_of(parent, args.teachers), on_epoch=log_epoch)
    val_f1 = evaluate_model(model, va.x, va.y, CLASSES)["macro_f1"] if len(va.x) else None
    test = evaluate_model(model, te.x, te.y, CLASSES)
    test.update(split=parent["metrics"].get("split"), test_folds=[3])
    # every argument that changes the soup is in its name: another run never overwrites it
    name = parent["version"]  # a registry name by its hash, a trial run in full
    label = (f"soup-e{args.epochs}-lr{args.lr:g}-s{'-'.join(map(str, args.seeds))}-"
             f"{name.rsplit('-', 1)[-1] if REGISTRY_NAME.fullmatch(name) else name}")
    soup = soup_record(parent, args.seeds, args.epochs, args.lr, scores)
    spec = {k: v for k, v in parent["data"]["test_set"].items() if k != "scores"}
    data = dict(parent["data"], soup=soup, test_set=with_scores(spec, label, test),
                train_config=dict(parent["data"]["train_config"], keep="last"))
    # one history row: the soup's own validation score, the one kept_val_f1 reads
    history = [{"epoch": 1, "epochs": 1, "val_f1": val_f1, "soup": True}]
    save_checkpoint(make_checkpoint(model, CLASSES, label, parent["version"], test, data,
                                    history), OUT / f"{label}.pt")
    record({"variant": "soup", "parent": parent["version"], "protocol": "fold3",
            "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds,
            "val_f1": val_f1 and round(val_f1, 4), "ingredient_val_f1": soup["ingredient_val_f1"],
            "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
            "minutes": round((time.time() - start) / 60, 1)})


def publish_soups(args: argparse.Namespace) -> None:
    from src import registry
    from src.model import kept_val_f1, load_checkpoint
    from src.model_card import render

    served = load_checkpoint(args.soup)
    soups = [served, *(load_checkpoint(p) for p in args.spread)]
    renamed: dict[str, str] = {}
    published = published_runs(args.models)
    parents = [load_checkpoint(p) for p in args.parent]  # first: the soups then name them
    for ckpt in [*parents, *soups]:
        register_name(ckpt, renamed, published)
        publish(ckpt, args.models)
    recipe = served["data"]["soup"]
    if is_refit(served):
        # nothing held out, so no validation score for the gate: a declared rule decides
        if not args.refit_verdict:
            raise SystemExit("error: a refit soup has no validation score for the gate; pass "
                             "--refit-verdict with the declared rule's verdict")
        replaced = serve(served, args.models)
        served_because = (
            f"Served: the soup of `{recipe['parent']}`, a refit (the recipe trained on every "
            "training-side clip, the 15% held out for early stopping included, final weights "
            "kept). A refit has no validation score for the 14:43 gate; by the rule declared "
            "before the runs (docs/trial-decisions.md, 3 Dec 19:42) the grouped protocol "
            f"decides instead: {args.refit_verdict}")
    else:
        if not args.parents_trained_at:
            raise SystemExit("error: pass --parents-trained-at (the commit that trained the "
                             "parents, for the card's Reproduce)")
        serving, replaced = serve_through_gate(served, args.models)
        if not serving:
            return
        parent_meta = [registry.version_metadata(s["data"]["soup"]["parent"], args.models)
                       for s in soups]
        served_because = (
            f"Served: the soup of `{recipe['parent']}`, by the rule declared before the soups "
            "ran (docs/trial-decisions.md, 3 Dec 16:59): the soup step joins the recipe if "
            "the soups' mean validation macro-F1 beats their parents' (here "
            f"{mean(map(kept_val_f1, soups)):.3f} against "
            f"{mean(map(kept_val_f1, parent_meta)):.3f}), and a soup serves only through the "
            "gate.")
    notes = [f"{served_because} With 387 test clips from few recordings, one clip is 0.26 "
             "points.", *replacement_note(served, replaced)]
    common = {"commit": args.trained_at or code_commit(),
              "teachers": " ".join(f"models/{t}.pt" for t in served["data"]["teachers"]),
              "seeds": " ".join(map(str, recipe["seeds"])), "epochs": recipe["epochs"],
              "lr": recipe["lr"]}
    reproduce = (REFIT_REPRODUCE.format(seed=served["data"]["train_config"]["seed"], **common)
                 if is_refit(served) else REPRODUCE.format(
                     parents_commit=args.parents_trained_at, **common,
                     parents=", ".join(f"models/{s['data']['soup']['parent']}.pt"
                                       for s in soups)))
    (args.models / "MODEL_CARD.md").write_text(render(
        served, reproduce, notes,
        seed_runs=sorted((seed_row(s) for s in soups), key=lambda r: r["seed"])
        if len(soups) > 1 else None))  # one run has no spread to show
    for soup in soups:
        m = soup["metrics"]
        print(f"{soup['version']} (soup of {soup['data']['soup']['parent']}): validation "
              f"macro-F1 {validation_figure(soup)}, fold-3 accuracy {m['accuracy']:.3f}, "
              f"macro-F1 {m['macro_f1']:.3f}")
    print(f"serving {served['version']}; card: {args.models / 'MODEL_CARD.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("make", help="fine-tune a parent per seed and average the weights")
    m.add_argument("parent", type=Path)
    m.add_argument("--teachers", type=Path, nargs="*", default=[],
                   help="default: the parent's own teachers, from models/")
    m.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    m.add_argument("--epochs", type=int, default=8)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    p = commands.add_parser("publish", help="name, publish and (through the gate) serve a soup")
    p.add_argument("soup", type=Path)
    p.add_argument("--spread", type=Path, nargs="*", default=[],
                   help="the other parents' soups: the card's seed table, never served")
    p.add_argument("--parent", type=Path, nargs="*", default=[],
                   help="the parent runs, when they are var/trials/ files not yet in models/")
    p.add_argument("--refit-verdict", default=None,
                   help="a refit soup: the declared rule's verdict, for its card")
    p.add_argument("--parents-trained-at", default=None,
                   help="commit that trained the parents (their card's Reproduce; not a refit)")
    p.add_argument("--trained-at", default=None, help="commit that made the soups "
                   "(default: this checkout's)")
    p.add_argument("--models", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    make(args) if args.command == "make" else publish_soups(args)


if __name__ == "__main__":
    main()
