"""Reading labelled clips from disk, whatever layout they arrive in.

Two layouts are understood: UrbanSound8K's own (``metadata/UrbanSound8K.csv`` +
``audio/foldN/``) and class-per-folder (``<root>/<class>/<file>``, with an optional
``manifest.csv`` giving fold, recording group and source). Everything downstream sees a list
of ``Clip`` records, so the trainer does not care where data came from.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .preprocessing import CLASSES, normalise_label

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff", ".au", ".w64", ".rf64"}
US8K_NAME = re.compile(r"^(?P<fsid>\d+)-(?P<classid>\d)-(?P<occ>\d+)-(?P<slice>\d+)$")
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("path", "label", "fold", "group", "source")


@dataclass(frozen=True)
class Clip:
    path: Path
    label: str
    fold: int | None = None
    group: str = ""  # the recording (fsID) the clip was sliced from; splits keep it whole
    source: str = "folder"  # us8k | folder | upload | synthetic

    @property
    def class_id(self) -> int:
        return CLASSES.index(self.label)


class DatasetError(UserError, ValueError):
    """The folder is not a data set we can read; the message says what was expected."""


def group_of(path: Path) -> str:
    """fsID for UrbanSound8K-named files, else the file stem (each file its own recording)."""
    m = US8K_NAME.match(path.stem)
    return m.group("fsid") if m else path.stem


def is_us8k(root: Path) -> bool:
    return (root / "metadata" / "UrbanSound8K.csv").is_file()


def read_us8k(root: Path, folds: set[int] | None = None) -> list[Clip]:
    """The official metadata decides label and fold; missing files are skipped (subsets)."""
    clips = []
    with open(root / "metadata" / "UrbanSound8K.csv", newline="") as f:
        for row in csv.DictReader(f):
            fold = int(row["fold"])
            if folds and fold not in folds:
                continue
            path = root / "audio" / f"fold{fold}" / row["slice_file_name"]
            if path.is_file():
                clips.append(Clip(path, CLASSES[int(row["classID"])], fold, row["fsID"], "us8k"))
    return clips


def read_manifest(root: Path) -> dict[str, dict[str, str]]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def write_manifest(root: Path, clips: list[Clip]) -> Path:
    """Paths relative to ``root`` so a data folder can be moved as a whole."""
    path = root / MANIFEST
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for c in clips:
            rel = c.path.relative_to(root).as_posix()
            writer.writerow([rel, c.label, "" if c.fold is None else c.fold, c.group, c.source])
    return path


def read_class_folders(root: Path) -> list[Clip]:
    """``root/<class>/<file>``; unknown folder names are an error, not silently dropped."""
    manifest = read_manifest(root)
    clips, unknown = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = normalise_label(sub.name)
        if label is None:
            unknown.append(sub.name)
            continue
        for path in sorted(sub.rglob("*")):
            if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
                continue
            row = manifest.get(path.relative_to(root).as_posix(), {})
            fold = int(row["fold"]) if row.get("fold") else None
            clips.append(Clip(path, label, fold, row.get("group") or group_of(path),
                              row.get("source") or "folder"))
    if unknown:
        raise DatasetError(
            f"{root}: folder(s) {', '.join(sorted(unknown))} are not class names "
            f"(expected some of: {', '.join(CLASSES)})."
        )
    return clips


def read_dataset(root: str | Path, folds: set[int] | None = None) -> list[Clip]:
    """Either layout; a folder holding ``train/`` and ``test/`` is read as both."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder.")
    if is_us8k(root):
        clips = read_us8k(root, folds)
    elif (root / "train").is_dir() and not normalise_label("train"):
        clips = [c for part in ("train", "test") if (root / part).is_dir()
                 for c in read_class_folders(root / part)]
        if folds:
            clips = [c for c in clips if c.fold in folds]
    else:
        clips = read_class_folders(root)
        if folds:
            clips = [c for c in clips if c.fold in folds]
    if not clips:
        raise DatasetError(
            f"{root}: no audio found. Expected the UrbanSound8K layout "
            "(metadata/UrbanSound8K.csv + audio/foldN/) or one folder per class."
        )
    return clips


def named_test_split(root: str | Path, test_folds: set[int] | None
                     ) -> tuple[str, list[Clip], list[Clip], str] | None:
    """``(kind, train, test, description)`` when the data itself names a test set: the clips of
    ``test_folds`` (kind ``folds``; training on the other folds), else a ``test/`` folder (kind
    ``folder``; training on ``train/``); None when it names none. Training from scratch and
    retraining both start here, so they agree on what "the test set" of a data folder is."""
    root = Path(root)
    if test_folds:
        clips = read_dataset(root)
        test = [c for c in clips if c.fold in test_folds]
        if test:
            return ("folds", [c for c in clips if c.fold not in test_folds], test,
                    f"fold(s) {sorted(test_folds)} of {root}")
    test_dir, train_dir = root / "test", root / "train"
    test = read_class_folders(test_dir) if test_dir.is_dir() else []
    if test:
        return ("folder", read_class_folders(train_dir) if train_dir.is_dir() else [], test,
                str(test_dir))
    return None


def summarise(clips: list[Clip]) -> dict[str, Any]:
    """Stored in checkpoints ("the data it saw") and printed by ``urbansound data stats``."""
    return {
        "n": len(clips),
        "per_class": dict(sorted(Counter(c.label for c in clips).items())),
        "folds": sorted({c.fold for c in clips if c.fold is not None}),
        "sources": dict(sorted(Counter(c.source for c in clips).items())),
        "recordings": len({c.group for c in clips}),
    }
