"""``urbansound analyze [--model PATH] [--window S] [--hop S] [--json] FILE...``: long
recordings, window by window, into a timeline of events (``src.analysis``).

``--json`` prints one object per file and line (``file``, ``duration_s``, ``model_version``,
``windows``, ``events``, ``summary`` ...); without it, a readable timeline. A file that cannot
be analysed is reported on stderr and the others go on; the exit code says whether any failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .common import friendly_errors, print_json

if TYPE_CHECKING:
    from ..analysis import Analysis

#: Files at least this long (by their header) get a progress bar on stderr.
PROGRESS_FROM_S = 60.0


def register(app: typer.Typer) -> None:
    """Attach this module's command to the root app."""
    app.command("analyze")(analyze)


@friendly_errors
def analyze(
    files: list[Path] = typer.Argument(..., help="Audio recordings of any length."),
    model: Path = typer.Option(None, help="Checkpoint file; default: the served version."),
    window: float = typer.Option(None, help="Window length in seconds (default: "
                                 "URBANSOUND_ANALYZE_WINDOW_S, 4)."),
    hop: float = typer.Option(None, help="Step between windows in seconds (default: "
                              "URBANSOUND_ANALYZE_HOP_S, 2)."),
    min_confidence: float = typer.Option(
        None, "--min-confidence", help="Below this mean probability a stretch is "
        "'uncertain', not an event (default: URBANSOUND_ANALYZE_MIN_CONFIDENCE, 0.5)."),
    json: bool = typer.Option(False, "--json", help="One JSON object per file and line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Analyse long recordings: classes over time, as events and seconds per class."""
    from ..analysis import Options, analyse
    from ..prediction import Predictor
    from ..preprocessing import AudioError, probe
    from ..settings import get_settings
    from . import resolve_model

    predictor = Predictor(resolve_model(model), precision=get_settings().inference_precision)
    options = Options.from_settings(window_s=window, hop_s=hop, config=predictor.config,
                                    min_confidence=min_confidence)
    options.check(predictor.config)  # a bad --window fails once, not once per file
    failed = 0
    for f in files:
        try:
            expected = probe(f).duration
            with _progress(f, expected, quiet) as on_progress:
                result = analyse(f, predictor, options, on_progress, name=str(f))
        except AudioError as exc:
            failed += 1
            typer.echo(f"error: {f}: {exc.message}", err=True)
            continue
        if json:
            print_json(result.to_dict())
        else:
            typer.echo(timeline(result))
    if failed:
        raise typer.Exit(1)


class _progress:
    """A tqdm bar on stderr for a long file (seconds of audio), nothing for a short one."""

    def __init__(self, path: Path, expected_s: float, quiet: bool):
        self.bar: Any = None
        if not quiet and expected_s >= PROGRESS_FROM_S and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=round(expected_s), unit="s", desc=path.name, leave=False,
                            file=sys.stderr)

    def __enter__(self) -> Any:
        if self.bar is None:
            return None

        def update(done_s: float, total_s: float) -> None:
            self.bar.total = max(self.bar.total, round(total_s))
            self.bar.update(round(done_s) - self.bar.n)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def clock(seconds: float) -> str:
    """``75.5`` → ``"1:15.5"``; ``3725`` → ``"1:02:05.0"``."""
    minutes, s = divmod(max(0.0, seconds), 60)
    hours, m = divmod(int(minutes), 60)
    return f"{hours}:{m:02d}:{s:04.1f}" if hours else f"{m}:{s:04.1f}"


def timeline(result: Analysis) -> str:
    """The readable form: events in order, then seconds per class, then any warning."""
    d = result.to_dict()
    lines = [f"{d['file']}: {clock(d['duration_s'])} analysed, {len(d['windows'])} windows of "
             f"{d['window_s']:g} s every {d['hop_s']:g} s, model {d['model_version']}"]
    for e in d["events"]:
        lines.append(f"  {clock(e['start_s']):>9} - {clock(e['end_s']):<9} "
                     f"{e['label']:<17} {e['confidence']:.2f}")
    if not d["events"]:
        lines.append("  no event reached the confidence threshold "
                     f"({d['min_confidence']:g})")
    heard = sorted(((k, v) for k, v in d["summary"].items() if v > 0), key=lambda kv: -kv[1])
    lines.append("  summary: " + ", ".join(f"{k} {v:.1f} s" for k, v in heard))
    lines += [f"  warning: {w}" for w in d["warnings"]]
    return "\n".join(lines)
