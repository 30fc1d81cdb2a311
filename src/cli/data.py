"""``urbansound data ...``: getting labelled audio onto disk and looking at it.

Kept apart from ``cli/__init__.py`` so the data commands (download, import, synth, stats, and the
``upload`` command registered onto ``app`` elsewhere) can grow without touching the rest.
Heavy modules are imported inside the commands: ``--help`` must stay instant.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..settings import get_settings
from .common import friendly_errors, print_json

if TYPE_CHECKING:
    from ..datasets import Clip

app = typer.Typer(
    help="Get data: download or import UrbanSound8K, write the synthetic demo set, inspect it.",
    no_args_is_help=True, add_completion=False,
)


@app.command()
@friendly_errors
def download(
    url: str = typer.Option(None, help="Archive URL. Default: the official UrbanSound8K one."),
    md5: str = typer.Option(None, help="Expected MD5. Default: the published one for the "
                            "official URL, none otherwise."),
    dest: Path = typer.Option(None, help="Folder for the archive and its unpacked tree. "
                              "Default: URBANSOUND_STATE_DIR/downloads."),
    import_: bool = typer.Option(True, "--import/--no-import",
                                 help="Unpack and import into URBANSOUND_DATA_DIR."),
    test_fold: list[int] = typer.Option([10], "--test-fold",
                                        help="Fold(s) imported as the test split."),
    data: Path = typer.Option(None, help="Import target. Default: URBANSOUND_DATA_DIR."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Download the UrbanSound8K archive (resumable, checksum-verified), then import it."""
    from .. import download as dl

    settings = get_settings()
    url = url or dl.US8K_URL
    if md5 is None and url == dl.US8K_URL:
        md5 = dl.US8K_MD5
    folder = dest or settings.state_dir / "downloads"
    target = data or settings.data_dir
    if import_:
        dl.check_import_target(target)  # fail now, not after hours of download
    archive = dl.download(url, folder / dl.archive_name(url), md5=md5, progress=not quiet)
    typer.echo(f"downloaded {archive} ({archive.stat().st_size / 2**20:.0f} MiB, "
               f"{'md5 verified' if md5 else 'no checksum given'})")
    if not import_:
        return
    typer.echo(f"unpacking {archive.name} ...")
    root = dl.extract_archive(archive, folder)
    _report_import(dl.import_us8k(root, target, set(test_fold), progress=not quiet))


@app.command(name="import")
@friendly_errors
def import_(
    src: Path = typer.Argument(..., help="An UrbanSound8K copy: metadata/UrbanSound8K.csv + "
                               "audio/foldN/."),
    test_fold: list[int] = typer.Option([10], "--test-fold",
                                        help="Fold(s) imported as the test split (repeatable)."),
    fold: list[int] = typer.Option(None, "--fold", help="Import only these folds "
                                   "(repeatable). Default: all."),
    data: Path = typer.Option(None, help="Target folder. Default: URBANSOUND_DATA_DIR."),
    link: bool = typer.Option(True, "--link/--copy",
                              help="Hardlink clips when possible (no extra disk) or copy."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Import an existing UrbanSound8K copy into the class-per-folder layout, folds kept."""
    from ..download import import_us8k

    target = data or get_settings().data_dir
    _report_import(import_us8k(src, target, set(test_fold), progress=not quiet, link=link,
                               folds=set(fold) if fold else None))


def _report_import(summary: dict[str, Any]) -> None:
    typer.echo(
        f"imported UrbanSound8K into {summary['data_dir']}: {summary['train']} train, "
        f"{summary['test']} test (test folds {summary['test_folds']}); "
        f"{summary['linked']} linked, {summary['copied']} copied, "
        f"{summary['skipped']} already there, {summary['moved']} moved between splits"
    )


@app.command()
@friendly_errors
def synth(
    out: Path = typer.Option(None, help="Output folder. Default: URBANSOUND_DATA_DIR."),
    per_class: int = typer.Option(20, min=1, help="Training clips per class."),
    test_per_class: int = typer.Option(6, min=0, help="Test clips per class."),
    seed: int = typer.Option(0, help="Same seed, same clips."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write the SYNTHETIC demo set (procedural sounds, not UrbanSound8K) for offline use."""
    from ..synth import generate

    target = out or get_settings().data_dir
    s = generate(target, per_class=per_class, test_per_class=test_per_class, seed=seed,
                 progress=not quiet)
    typer.echo(f"wrote a SYNTHETIC data set (not UrbanSound8K) to {target}: {s['train']} train "
               f"+ {s['test']} test clips, {s['seconds'] / 60:.1f} min of audio, seed {seed}")


def _audio_stats(clips: list[Clip]) -> dict[str, Any]:
    """Durations and formats from headers only: a full data set is probed in seconds."""
    from ..preprocessing import AudioError, probe

    durations: list[float] = []
    unreadable: list[str] = []
    rates: Counter[int] = Counter()
    channels: Counter[int] = Counter()
    subtypes: Counter[str] = Counter()
    for clip in clips:
        try:
            info = probe(clip.path)
        except AudioError as exc:
            unreadable.append(f"{clip.path}: {exc.message}")
            continue
        durations.append(info.duration)
        rates[info.samplerate] += 1
        channels[info.channels] += 1
        subtypes[info.subtype] += 1
    seconds = sum(durations)
    return {
        "duration_s": {
            "min": round(min(durations), 3) if durations else None,
            "mean": round(seconds / len(durations), 3) if durations else None,
            "max": round(max(durations), 3) if durations else None,
            "total": round(seconds, 1),
            "under_4s": sum(d < 3.999 for d in durations),
        },
        "sample_rates": dict(sorted(rates.items())),
        "channels": dict(sorted(channels.items())),
        "subtypes": dict(sorted(subtypes.items())),
        "unreadable": unreadable,
    }


def _splits(root: Path, clips: list[Clip]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for clip in clips:
        try:
            first = clip.path.relative_to(root).parts[0]
        except ValueError:
            first = ""
        counts[first if first in ("train", "test") else "all"] += 1
    return dict(sorted(counts.items()))


@app.command()
@friendly_errors
def stats(
    data: Path = typer.Option(None, help="Data folder (either layout). "
                              "Default: URBANSOUND_DATA_DIR."),
    json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Clips per class, split, fold and source; durations, sample rates and formats."""
    from ..datasets import read_dataset, summarise

    root = data or get_settings().data_dir
    clips = read_dataset(root)
    report = {"data": str(root), **summarise(clips), "splits": _splits(root, clips),
              **_audio_stats(clips)}
    report["synthetic"] = "synthetic" in report["sources"]
    if json:
        print_json(report)
        return
    _print_stats(report)


def _print_stats(r: dict[str, Any]) -> None:
    d = r["duration_s"]
    if r["synthetic"]:
        typer.echo("NOTE: this folder holds SYNTHETIC clips (src/synth.py), not UrbanSound8K.")
    typer.echo(f"{r['data']}: {r['n']} clips from {r['recordings']} recordings; "
               f"splits {r['splits']}; folds {r['folds'] or 'none'}; sources {r['sources']}")
    for label, n in r["per_class"].items():
        typer.echo(f"  {label:<17} {n:>6}")
    if d["total"]:
        typer.echo(f"duration: {d['min']:.2f}-{d['max']:.2f} s, mean {d['mean']:.2f} s, "
                   f"total {d['total'] / 3600:.2f} h; {d['under_4s']} shorter than 4 s")
    typer.echo(f"sample rates: {r['sample_rates']}; channels: {r['channels']}; "
               f"formats: {r['subtypes']}")
    if r["unreadable"]:
        typer.echo(f"{len(r['unreadable'])} unreadable clip(s), e.g. {r['unreadable'][0]}")
