"""Train recipe variants and record their scores: the evidence behind the served recipe.

    URBANSOUND_TORCH_THREADS=1 nice -n 10 .venv/bin/python scripts/recipe_trials.py \
        VARIANT [--seeds 0 1 2] [--protocol fold3|grouped] [--k 3] [--epochs 40]
    .venv/bin/python scripts/recipe_trials.py --report | --compare A B

``fold3``: train on folds 1, 2, 4-9 of ../shared/us8k, test on fold 3 (the served model's
split); the checkpoint is kept under var/trials/ so a winner can be published or used as a
teacher. ``grouped``: the validation protocol (``src.crossval.grouped_cv``): k recording-grouped
folds inside the training folds, fold 3 never read. Every run appends one JSON line to
var/trials/results.jsonl; ``--report`` prints the table of everything recorded so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
US8K = ROOT.parent / "shared" / "us8k"
OUT = ROOT / "var" / "trials"
DEFAULT_EPOCHS = 40


def served_recipe_variants(name: str, **changes: Any) -> dict[str, tuple[dict[str, Any],
                                                                         dict[str, Any]]]:
    """One change to the served recipe, as the two runs a trial of it needs: students with
    15% held out (``-last``, judged on validation) and the refit on every clip (``-all``)."""
    recipe = {"envelope": True, "keep": "last", "time_pool": "attention", **changes}
    features = {"frontend": "logmel+pcen"}
    return {f"pcen-envelope-attention-{name}-last": (recipe, features),
            f"pcen-envelope-attention-{name}-all": ({**recipe, "validation": 0.0}, features)}


#: name -> (TrainConfig changes, FeatureConfig changes) from ``BASE``, the log-mel recipe that
#: served until PCEN won (its teachers: models/20261126T*); each variant names what it changes.
#: "pcen-envelope" is today's default recipe.
BASE: tuple[dict[str, Any], dict[str, Any]] = ({"envelope": False, "time_pool": "meanmax"},
                                               {"frontend": "logmel"})
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "base": ({}, {}),
    "bands": ({"freq_pool": "bands"}, {}),
    "bands-noeq": ({"freq_pool": "bands", "eq_std": 0.0, "band_shift": 0}, {}),
    "noeq": ({"eq_std": 0.0, "band_shift": 0}, {}),
    "eq-strong": ({"eq_std": 0.6, "band_shift": 3}, {}),
    "eq-max": ({"eq_std": 1.0, "band_shift": 4}, {}),
    "regular": ({"dropout": 0.5, "weight_decay": 0.05, "mixup_prob": 0.8}, {}),
    "pcen": ({}, {"frontend": "logmel+pcen"}),
    "pcen-last": ({"keep": "last"}, {"frontend": "logmel+pcen"}),
    "delta": ({}, {"frontend": "logmel+delta"}),
    "pcen-delta": ({}, {"frontend": "logmel+pcen+delta"}),
    "hop256": ({}, {"hop_length": 256}),
    "envelope": ({"envelope": True}, {}),
    "pcen-envelope": ({"envelope": True}, {"frontend": "logmel+pcen"}),
    "pcen-envelope-last": ({"envelope": True, "keep": "last"}, {"frontend": "logmel+pcen"}),
    "mels128": ({}, {"n_mels": 128, "n_fft": 2048}),
    # a refit: the recipe trained on the whole training side, the held-out 15% included
    "pcen-envelope-all": ({"envelope": True, "keep": "last", "validation": 0.0},
                          {"frontend": "logmel+pcen"}),
    # the refit with speed perturbation (playback speed 1 ± 10%, Ko et al. 2015): aimed at the
    # machine classes, whose few training recordings each run at one speed
    "pcen-envelope-speed-all": ({"envelope": True, "keep": "last", "validation": 0.0,
                                 "speed": 0.1}, {"frontend": "logmel+pcen"}),
    # the refit with attention pooling over time (TIME_POOLS): a clip's label is its salient
    # source, which often sounds for only part of the clip
    "pcen-envelope-attention-all": ({"envelope": True, "keep": "last", "validation": 0.0,
                                     "time_pool": "attention"}, {"frontend": "logmel+pcen"}),
    # the attention refit with lighter regularisation: dropout 0.3 -> 0.1, mixup on a quarter
    # of the batches instead of half (the mirror image of "regular", which lost 0.05 on fold 3)
    "pcen-envelope-attention-light-all": ({"envelope": True, "keep": "last", "validation": 0.0,
                                           "time_pool": "attention", "dropout": 0.1,
                                           "mixup_prob": 0.25}, {"frontend": "logmel+pcen"}),
    # the attention refit with skips over the last two stages' second convolution (Residual)
    "pcen-envelope-attention-residual-all": ({"envelope": True, "keep": "last", "validation": 0.0,
                                              "time_pool": "attention", "residual": True},
                                             {"frontend": "logmel+pcen"}),
    # the teachers' configurations with today's attention head (15% held out, best epoch),
    # and the served recipe with 15% held out (final weights): a student of either line of
    # teachers is judged on the validation split, which no teacher has seen
    "pcen-attention": ({"time_pool": "attention"}, {"frontend": "logmel+pcen"}),
    "pcen-envelope-attention": ({"envelope": True, "time_pool": "attention"},
                                {"frontend": "logmel+pcen"}),
    "pcen-envelope-attention-last": ({"envelope": True, "keep": "last", "time_pool": "attention"},
                                     {"frontend": "logmel+pcen"}),
    # BirdNET's linear probe as a second teacher beside the CNN teachers (src/birdnet.py):
    # held out (judged on validation) and refit
    **served_recipe_variants("birdnet", birdnet_teacher=True),
    # the same with the probe fitted on every clip it teaches (in-sample), as the CNN teachers
    **served_recipe_variants("birdnet-insample", birdnet_teacher=True, birdnet_folds=0),
    # the served recipe's students at distillation temperature 4 instead of 2 (Hinton et al.
    # 2015): softer targets carry more of the teachers' ranking of the wrong classes
    **served_recipe_variants("t4", distill_temperature=4.0),
    # the served recipe with a longer weight average (SWA-like, Izmailov et al. 2018): EMA
    # decay 0.999, which fit's cap turns into a horizon of a quarter of the schedule (~10
    # epochs) instead of 0.995's ~4
    **served_recipe_variants("ema", ema_decay=0.999),
}


def configs(name: str, seed: int, epochs: int):
    from src.model import TrainConfig
    from src.preprocessing import FeatureConfig

    train_changes = {**BASE[0], **VARIANTS[name][0]}
    feature_changes = {**BASE[1], **VARIANTS[name][1]}
    cfg = TrainConfig(epochs=epochs, patience=12, seed=seed, **train_changes)
    return cfg, replace(FeatureConfig(), **feature_changes)


def variant_of(ckpt: dict[str, Any]) -> str:
    """The variant that trains a checkpoint's recipe, for a card's Reproduce block: the first
    in ``VARIANTS`` (the order they were added) that agrees with every field the checkpoint
    recorded. Older checkpoints recorded fewer fields; what they lack did not exist yet, so
    the oldest variant that agrees is the one that trained them."""
    from src.model import TrainConfig

    recorded = {k: v for k, v in TrainConfig.from_dict(ckpt["data"]["train_config"]).to_dict()
                .items() if k in ckpt["data"]["train_config"]}  # widths: a list either way
    features = ckpt["feature_config"]
    for name in VARIANTS:
        cfg, config = configs(name, recorded["seed"], recorded["epochs"])
        if (all(v == recorded[k] for k, v in cfg.to_dict().items() if k in recorded)
                and all(v == features[k] for k, v in config.to_dict().items() if k in features)):
            return name
    raise ValueError(f"no variant of scripts/recipe_trials.py trains {ckpt['version']}")


def run_label(name: str, epochs: int, student: bool = False, tag: str = "") -> str:
    """A student, a schedule other than the default, or a tagged run (students of another
    line of teachers) is its own row in the table (and its own file under var/trials/), on
    either protocol."""
    return (f"{name}-student" if student else name) + (
        f"-e{epochs}" if epochs != DEFAULT_EPOCHS else "") + (f"-{tag}" if tag else "")


def record(row: dict[str, Any]) -> None:
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def log_epoch(r: dict[str, Any]) -> None:
    print(f"epoch {r['epoch']}/{r['epochs']} loss {r['loss']:.3f} val F1 {r['val_f1'] or 0:.3f}"
          f" ({r['seconds']:.0f} s)", flush=True)


def run_fold3(name: str, seed: int, epochs: int, cache: Path,
              teachers: list[Path] | None = None, tag: str = "") -> None:
    from src.model import kept_val_f1, load_checkpoint, save_checkpoint
    from src.train import train

    cfg, config = configs(name, seed, epochs)
    start = time.time()
    label = run_label(name, epochs, bool(teachers), tag)
    result = train(US8K, {3}, cfg, config, cache_dir=cache, version=f"{label}-s{seed}",
                   progress=False, on_epoch=log_epoch,
                   teachers=[load_checkpoint(t) for t in teachers or []] or None)
    save_checkpoint(result.checkpoint, OUT / f"{label}-s{seed}.pt")
    m, h = result.test_metrics, result.history
    record({"variant": label, "seed": seed, "protocol": "fold3", "epochs_run": len(h),
            "teachers": [t.stem for t in teachers or []],
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "best_val_f1": max(r["val_f1"] or 0 for r in h),
            "kept_val_f1": kept_val_f1(result.checkpoint),  # the score of the weights saved
            "per_class_f1": {c: round(s["f1"], 3) for c, s in m["per_class"].items()},
            "minutes": round((time.time() - start) / 60, 1)})


def run_grouped(name: str, seed: int, epochs: int, k: int, cache: Path) -> None:
    from src.crossval import grouped_cv

    cfg, config = configs(name, seed, epochs)
    start = time.time()
    label = run_label(name, epochs)
    summary = grouped_cv(US8K, exclude_folds={3}, k=k, cfg=cfg, config=config,
                         cache_dir=cache, seed=0, on_fold=lambda r: print(
                             f"{r['fold']}: accuracy {r['accuracy']:.3f} macro-F1 "
                             f"{r['macro_f1']:.3f} ({r['seconds']:.0f} s)", flush=True))
    # the whole summary, as the model card's validation section reads it
    (OUT / f"{label}-grouped{k}-s{seed}.json").write_text(json.dumps(summary, indent=1) + "\n")
    record({"variant": label, "seed": seed, "protocol": f"grouped-{k}", "epochs": epochs,
            **{key: summary[key] for key in ("accuracy_mean", "accuracy_std", "macro_f1_mean",
                                             "macro_f1_std")},
            "per_split_accuracy": [round(r["accuracy"], 3) for r in summary["per_fold"]],
            "minutes": round((time.time() - start) / 60, 1)})


def recorded() -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every recorded run by (variant, protocol, seed); a seed run again (a reproduction
    check) counts once: the latest."""
    results = OUT / "results.jsonl"  # written by the first run to finish (none in a new checkout)
    rows = ([json.loads(line) for line in results.read_text().splitlines()]
            if results.exists() else [])
    return {(r["variant"], r["protocol"], r["seed"]): r for r in rows}


def score(run: dict[str, Any], key: str) -> float:
    """``accuracy`` or ``macro_f1`` of a run: fold 3's, or the grouped protocol's mean;
    ``kept_val_f1``: the validation macro-F1 of a fold-3 run's saved weights (a grouped run
    keeps no weights, so it has none)."""
    return float(run[key] if key in run else run[f"{key}_mean"])


def scores(run: dict[str, Any], key: str) -> bool:
    """Whether ``score`` has a figure for ``key`` in this run."""
    return key in run or f"{key}_mean" in run


def report() -> None:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (name, protocol, _), r in recorded().items():
        by.setdefault((name, protocol), []).append(r)
    for (name, protocol), runs in sorted(by.items()):
        accs = [score(r, "accuracy") for r in runs]
        f1s = [score(r, "macro_f1") for r in runs]
        spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        if protocol != "fold3" and len(runs) == 1:  # one protocol run: its spread over folds
            spread = f" ± {runs[0]['accuracy_std']:.3f} over folds"
        print(f"{name:<14} {protocol:<10} n={len(runs)} accuracy {statistics.mean(accs):.3f}"
              f"{spread}  macro-F1 {statistics.mean(f1s):.3f}  runs: "
              f"{', '.join(f'{a:.3f}/{f:.3f}' for a, f in zip(accs, f1s, strict=True))}")


def compare(a: str, b: str, keys: tuple[str, ...] = ("accuracy", "macro_f1")) -> None:
    """Paired differences, ``b`` minus ``a``: the same seed (and, on the grouped protocol, the
    same folds) on both sides, so the seed's and the split's luck cancel; the judge for rules
    like those in docs/trial-decisions.md. Each protocol is summarised on its own."""
    latest = recorded()
    protocols = sorted({p for v, p, seed in latest if v == b and (a, p, seed) in latest
                        and all(scores(latest[(v, p, seed)], key) for key in keys)})
    if not protocols:
        raise SystemExit(f"no seed ran under both {a} and {b} on one protocol")
    for protocol in protocols:
        diffs: dict[str, list[float]] = {key: [] for key in keys}
        for seed in sorted(s for v, p, s in latest if v == b and p == protocol):
            if (a, protocol, seed) not in latest:
                continue
            left, right = latest[(a, protocol, seed)], latest[(b, protocol, seed)]
            line = []
            for key, values in diffs.items():
                x, y = score(left, key), score(right, key)
                values.append(y - x)
                line.append(f"{key} {x:.3f} -> {y:.3f} ({y - x:+.3f})")
            splits = zip(left.get("per_split_accuracy", []),
                         right.get("per_split_accuracy", []), strict=True)
            per_split = ", ".join(f"{y - x:+.3f}" for x, y in splits)
            print(f"{protocol} seed {seed}: {'  '.join(line)}"
                  + (f"  per split accuracy {per_split}" if per_split else ""))
        for key, values in diffs.items():
            spread = f" ± {statistics.stdev(values):.3f} (sd)" if len(values) > 1 else ""
            print(f"{protocol}: mean {key} difference {statistics.mean(values):+.4f}{spread} "
                  f"over {len(values)} seed(s); lowest {min(values):+.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", nargs="?", choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--protocol", choices=("fold3", "grouped"), default="fold3")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "cache")
    parser.add_argument("--teachers", type=Path, nargs="+", default=None,
                        help="fold3 only: distil these checkpoints' ensemble (a student run)")
    parser.add_argument("--report", action="store_true", help="print the recorded table")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="paired differences B - A, seed by seed (recorded labels, e.g. "
                        "pcen-envelope pcen-envelope-last)")
    parser.add_argument("--validation", action="store_true",
                        help="with --compare: the kept weights' validation macro-F1 (a gate "
                        "that reads validation only) instead of the test scores")
    parser.add_argument("--tag", default="", help="fold3: a suffix naming the run's line "
                        "(students of other teachers), so its file and row are its own")
    args = parser.parse_args()
    # before any run: a grouped run writes its summary only once its last fold has trained
    OUT.mkdir(parents=True, exist_ok=True)
    if args.compare:
        a, b = args.compare
        compare(a, b, keys=("kept_val_f1",) if args.validation else ("accuracy", "macro_f1"))
        return
    if args.report or not args.variant:
        report()
        return
    for seed in args.seeds:
        if args.protocol == "fold3":
            run_fold3(args.variant, seed, args.epochs, args.cache, args.teachers, args.tag)
        else:
            run_grouped(args.variant, seed, args.epochs, args.k, args.cache)


if __name__ == "__main__":
    main()
