"""``urbansound crossval``: the official UrbanSound8K 10-fold protocol, resumable.

Exit codes: 0 when every listed fold finished, 1 on bad input (no folds, a missing fold,
not a data set) with a one-line reason on stderr. Per-fold results live under the state
folder (``URBANSOUND_STATE_DIR``/crossval/<run key>/); running the same command again skips
the folds already finished, ``--fresh`` recomputes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..settings import get_settings
from .common import (
    KEEP_HELP,
    RESIDUAL_HELP,
    TIME_POOL_HELP,
    VALIDATION_HELP,
    friendly_errors,
    print_json,
    with_choices,
)


def register(app: typer.Typer) -> None:
    """Attach this module's command to the root app."""
    app.command("crossval")(crossval)


@friendly_errors
def crossval(
    data: Path = typer.Option(..., help="UrbanSound8K folder (or class folders with a "
                              "manifest.csv that names each clip's fold)."),
    folds: list[int] = typer.Option(None, "--folds", help="Test folds to run (repeat; "
                                    "default: every fold present)."),
    epochs: int = typer.Option(40, min=1, help="Most epochs per fold (early stopping may "
                               "end sooner)."),
    patience: int = typer.Option(12, min=1, help="Epochs without validation macro-F1 gain."),
    keep: str = typer.Option(None, help=KEEP_HELP),
    validation: float = typer.Option(None, help=VALIDATION_HELP),
    seed: int = typer.Option(0),
    time_pool: str = typer.Option(None, "--time-pool", help=TIME_POOL_HELP),
    residual: bool = typer.Option(None, "--residual/--no-residual", help=RESIDUAL_HELP),
    json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    fresh: bool = typer.Option(False, "--fresh", help="Recompute folds finished before."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train on all folds but one, test on that one, for each fold: mean ± std of accuracy and
    macro-F1, the per-fold table and the summed confusion matrix (Salamon et al., 2014)."""
    from ..crossval import official
    from ..model import TrainConfig

    settings = get_settings()
    cfg = TrainConfig(epochs=epochs, patience=patience, seed=seed)
    cfg = with_choices(cfg, keep, validation, time_pool, residual)
    say = (lambda _row: None) if json or quiet else _fold_line
    summary = official(data, folds or None, cfg, cache_dir=settings.cache_dir,
                       state_dir=settings.state_dir, progress=not quiet, fresh=fresh,
                       on_fold=say)
    if json:
        print_json(summary)
        return
    typer.echo(describe(summary))


def _fold_line(row: dict[str, Any]) -> None:
    note = " (from an earlier run)" if row.get("resumed") else ""
    typer.echo(f"{row['fold']}: accuracy {row['accuracy']:.3f}  macro-F1 {row['macro_f1']:.3f}"
               f"  n={row['n']}{note}")


def describe(s: dict[str, Any]) -> str:
    """The human report: headline, per-fold table, summed confusion matrix."""
    lines = [
        f"{s['n_folds']}-fold cross-validation on {s['data']} ({s['n']} test clips in all)",
        f"accuracy {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f}   "
        f"macro-F1 {s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f}   (mean ± std over folds)",
        "",
        f"{'fold':<8}{'n':>6}{'accuracy':>10}{'macro-F1':>10}{'epochs':>8}",
        *(f"{r['fold']:<8}{r['n']:>6}{r['accuracy']:>10.3f}{r['macro_f1']:>10.3f}"
          f"{r['epochs']:>8}" for r in s["per_fold"]),
        "",
        "confusion matrix, summed over folds (rows: true, columns: predicted)",
    ]
    short = [c[:6] for c in s["classes"]]
    lines.append(" " * 18 + "".join(f"{c:>7}" for c in short))
    for name, row in zip(s["classes"], s["confusion_matrix"], strict=True):
        lines.append(f"{name:<18}" + "".join(f"{v:>7}" for v in row))
    if s.get("results_dir"):
        lines += ["", f"per-fold results: {s['results_dir']}"]
    return "\n".join(lines)
