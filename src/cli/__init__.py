"""The ``urbansound`` command line: the contract scripts, tests and people rely on.

Heavy imports (torch, Flask, Celery) happen inside commands so ``--help`` stays instant and
each command only pays for what it uses. Every command reports errors as one line on stderr
with a non-zero exit (``common.friendly_errors``).

One module per command group: ``data`` (download, import, synth, stats), ``ops`` (db, models,
data upload), and the commands that start or talk to services, ``worker`` (worker, retrain),
``web`` (serve, up) and ``stack`` (stack up/down/status), which import Flask/Celery only inside
their commands, so the rest of the CLI stays fast. ``python -m src.cli`` runs it too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from ..settings import get_settings
from . import analyze, crossval, data, ops, stack, web, worker
from .common import (
    KEEP_HELP,
    RESIDUAL_HELP,
    TIME_POOL_HELP,
    VALIDATION_HELP,
    friendly_errors,
    print_json,
    with_choices,
)

app = typer.Typer(
    help="urbansound: classify urban sounds, serve the model, keep it fresh.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
data.app.command("upload")(ops.upload)
app.add_typer(data.app, name="data")
app.add_typer(ops.db_app, name="db")
app.add_typer(ops.models_app, name="models")
for _services in (worker, web, stack, crossval, analyze):
    _services.register(app)


@app.command()
@friendly_errors
def train(
    data: Path = typer.Option(None, help="Data folder (UrbanSound8K or class-per-folder). "
                              "Default: URBANSOUND_DATA_DIR, made synthetic if empty."),
    test_fold: list[int] = typer.Option(None, "--test-fold", help="Fold(s) held out for test."),
    epochs: int = typer.Option(40, min=1, help="Most epochs (early stopping may end sooner)."),
    batch_size: int = typer.Option(32, min=2),
    lr: float = typer.Option(3e-3, help="Peak learning rate of the one-cycle schedule."),
    seed: int = typer.Option(0),
    patience: int = typer.Option(12, help="Epochs without validation macro-F1 gain "
                                 "(counted once the learning rate has peaked)."),
    keep: str = typer.Option(None, help=KEEP_HELP),
    validation: float = typer.Option(None, help=VALIDATION_HELP),
    activate: bool = typer.Option(True, help="Serve the new version once trained."),
    out: Path = typer.Option(None, help="Also write the checkpoint to this path."),
    teacher: list[str] = typer.Option(None, "--teacher", help="Distil the ensemble of these "
                                      "checkpoints (files or registered versions; repeat)."),
    distill_weight: float = typer.Option(0.7, min=0.0, max=1.0,
                                         help="With --teacher: weight of the soft targets."),
    birdnet_teacher: bool = typer.Option(False, "--birdnet-teacher",
                                         help="With --teacher: a linear probe on BirdNET's "
                                         "embedding teaches beside them (needs the teacher "
                                         "extra; the model then carries BirdNET's CC BY-NC-SA "
                                         "4.0 licence)."),
    frontend: str = typer.Option(None, help="Image channels: logmel, logmel+pcen, "
                                 "logmel+delta or logmel+pcen+delta (default: logmel+pcen)."),
    envelope: bool = typer.Option(None, "--envelope/--no-envelope",
                                  help="The head also sees each band's mean and spread "
                                  "(default: on)."),
    time_pool: str = typer.Option(None, "--time-pool", help=TIME_POOL_HELP),
    residual: bool = typer.Option(None, "--residual/--no-residual", help=RESIDUAL_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a model from scratch, evaluate it on the held-out test clips and register it."""
    from .. import registry
    from ..model import TrainConfig, load_checkpoint, save_checkpoint
    from ..preprocessing import FRONTENDS, FeatureConfig
    from ..train import train as run_training

    settings = get_settings()
    if frontend is not None and frontend not in FRONTENDS:
        raise typer.BadParameter(f"--frontend must be one of {', '.join(FRONTENDS)}")
    if birdnet_teacher:
        if not teacher:
            raise typer.BadParameter("--birdnet-teacher teaches beside the CNN teachers: add "
                                     "--teacher (one or more checkpoints)")
        from ..birdnet import require

        require()
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience,
                      distill_weight=distill_weight, birdnet_teacher=birdnet_teacher)
    cfg = with_choices(cfg, keep, validation, time_pool, residual, envelope)
    data = data or ensure_default_data()  # after the checks: a usage error writes nothing
    version = registry.new_version_name()
    config = FeatureConfig(frontend=frontend) if frontend else FeatureConfig()
    teachers = [load_checkpoint(resolve_model(t)) for t in teacher or []]
    result = run_training(data, set(test_fold or []) or None, cfg, config,
                          cache_dir=settings.cache_dir, version=version, progress=not quiet,
                          teachers=teachers)
    m = result.test_metrics
    typer.echo(f"test ({m['split']}): accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"
               f"  loss {m['loss']:.3f}  n={m['n']}")
    tmp = save_checkpoint(result.checkpoint, settings.state_dir / "tmp" / f"{version}.pt")
    path = registry.publish(tmp, version, models_dir=settings.models_dir)
    report_dir = write_reports(m, version)
    typer.echo(f"saved {path} (reports in {report_dir})")
    if out:
        save_checkpoint(result.checkpoint, out)
    if activate:
        registry.activate(version, models_dir=settings.models_dir)
        typer.echo(f"now serving {version}")


def write_reports(metrics: dict[str, Any], version: str) -> Path:
    from ..evaluation import plot_confusion_matrix, write_report

    out = get_settings().state_dir / "reports" / version
    write_report(metrics, out / "metrics.json")
    plot_confusion_matrix(metrics, out / "confusion_matrix.png")
    return out


def ensure_default_data() -> Path:
    """The embedded default trains on the synthetic set when no data folder exists yet."""
    from ..datasets import AUDIO_EXTENSIONS

    data = get_settings().data_dir
    has_audio = data.is_dir() and any(p.suffix.lower() in AUDIO_EXTENSIONS
                                      for p in data.rglob("*"))
    if not has_audio:
        from .. import synth

        typer.echo(f"{data} has no audio: writing the SYNTHETIC demo set there (not UrbanSound8K)")
        synth.generate(data)
    return data


def resolve_model(model: Path | str | None) -> Path:
    """A checkpoint file, a registered version's name, or (None) the served version."""
    from .. import registry

    models_dir = get_settings().models_dir
    if not model:
        return registry.current(models_dir)[1]
    if not Path(model).is_file():
        with contextlib.suppress(registry.RegistryError):  # not a version name either
            registered = registry.version_path(str(model), models_dir)
            if registered.is_file():
                return registered
    return Path(model)  # load_checkpoint reports a missing file


@app.command()
@friendly_errors
def evaluate(
    data: Path = typer.Option(..., help="Folder of labelled clips (either layout)."),
    model: Path = typer.Option(None, help="Checkpoint file; default: the served version."),
    folds: list[int] = typer.Option(None, "--folds", help="Only these folds."),
    json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    report: Path = typer.Option(None, help="Also write the JSON report and confusion PNG here."),
) -> None:
    """Accuracy, loss, precision, recall, F1 and confusion matrix of a model on labelled clips."""
    import numpy as np

    from ..datasets import read_dataset
    from ..evaluation import plot_confusion_matrix, write_report
    from ..model import evaluate_model
    from ..prediction import Predictor
    from ..train import Split, set_threads

    set_threads()
    predictor = Predictor(resolve_model(model), optimise=False)
    clips = read_dataset(data, set(folds) if folds else None)
    split = Split.load(clips, predictor.config, get_settings().cache_dir, progress=not json)
    m = evaluate_model(predictor.model, split.x, np.asarray(split.y), predictor.classes)
    m.update(model_version=predictor.version, data=str(data),
             folds=sorted({c.fold for c in split.clips if c.fold is not None}),
             skipped=len(clips) - len(split.clips))
    if report:
        write_report(m, report / "metrics.json")
        plot_confusion_matrix(m, report / "confusion_matrix.png")
    if json:
        print_json(m)
        return
    typer.echo(f"model {m['model_version']} on {m['n']} clips of {data} (folds {m['folds']})")
    typer.echo(f"accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  loss {m['loss']:.3f}"
               f"  precision {m['precision']:.3f}  recall {m['recall']:.3f}")
    for name, s in m["per_class"].items():
        typer.echo(f"  {name:<17} P {s['precision']:.2f}  R {s['recall']:.2f}  F1 {s['f1']:.2f}"
                   f"  n={s['support']}")


@app.command()
@friendly_errors
def predict(
    files: list[Path] = typer.Argument(..., help="Audio files."),
    model: Path = typer.Option(None, help="Checkpoint file; default: the served version."),
    json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    top_k: int = typer.Option(3, min=1, max=10),
) -> None:
    """Label each clip. Bad files are reported on stderr; the exit code says if any failed."""
    from ..prediction import Predictor
    from ..preprocessing import AudioError

    predictor = Predictor(resolve_model(model), precision=get_settings().inference_precision)
    failed = 0
    for f in files:
        try:
            p = predictor.predict(f, top_k)
        except AudioError as exc:
            failed += 1
            typer.echo(f"error: {f}: {exc.message}", err=True)
            continue
        if json:
            print_json({"file": str(f), **p.to_dict()})
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in p.top_k[1:])
            heard = ""
            if p.duration_s and p.analysed_s and p.duration_s > p.analysed_s + 0.05:
                heard = (f" [first {p.analysed_s:.1f} s of {p.duration_s:.1f} s; "
                         "`urbansound analyze` hears it all]")
            typer.echo(f"{f}: {p.label} ({p.confidence:.2f}; then {others}){heard}")
    if failed:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="urbansound")

