"""Per-file verdicts on uploaded files: is this name safe, is this a clip training can use?

Used by ``src.ingest`` for every uploaded file and by ``src.archives`` for archive members.
Nothing here touches the database or the stored uploads: a check reads a name and bytes and
either fills in a ``FileResult`` or raises ``Reject`` with a stable ``code`` and a message for
people. The codes decided here: ``not_found``, ``empty``, ``too_large``, ``not_audio``,
``unsafe_path``, ``unknown_label``, ``duplicate`` (within the batch), ``in_test_set`` (belongs
to the quality gate's test set), ``bad_rate``, ``too_short``, ``too_long``; the decoder adds
``undecodable``, ``bad_channels``, ``silent`` and ``non_finite`` (``AudioError``).

The audio checks are exactly what ``load_clip`` runs (``decode`` + ``check_samples``), so
anything accepted here loads at training time.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from . import datasets
from .preprocessing import (
    CLASSES,
    FeatureConfig,
    check_samples,
    decode,
    normalise_label,
    probe,
    to_mono,
)
from .settings import Settings

MIN_RATE, MAX_RATE = 8_000, 192_000
MIB = 1 << 20
CHUNK = 1 << 20
SKIPPED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
FORMAT_EXTENSIONS = {"WAV": ".wav", "WAVEX": ".wav", "FLAC": ".flac", "OGG": ".ogg",
                     "MP3": ".mp3", "MPEG": ".mp3", "AIFF": ".aiff", "AU": ".au",
                     "W64": ".w64", "RF64": ".rf64"}
_DRIVE = re.compile(r"^[A-Za-z]:")

Content = bytes | Path | IO[bytes]
InTestSet = Callable[[str, str], str | None]


@dataclass
class FileResult:
    """The verdict on one file; ``code`` is empty for accepted files."""

    name: str
    accepted: bool = False
    code: str = ""
    message: str = ""
    label: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    format: str = ""
    clip_id: int | None = None
    path: str | None = None  # relative to settings.uploads_dir

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reject(Exception):
    """One file refused: ``code`` for machines, ``message`` for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# --------------------------------------------------------------------------- names

def split_name(name: str) -> list[str]:
    """Path components of an uploaded name, or ``Reject('unsafe_path')``.

    Names are never used to build a path on disk (files are stored by label and hash), but a
    name that climbs out of its folder is a sign of a crafted archive and is refused."""
    norm = name.replace("\\", "/")
    if "\x00" in norm:
        raise Reject("unsafe_path", "The name contains a NUL byte.")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise Reject("unsafe_path", "Absolute paths are not allowed in uploads.")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Reject("unsafe_path", "'..' in a name could escape the upload folder.")
    if not parts:
        raise Reject("unsafe_path", "The name is empty.")
    return parts


def skippable(parts: list[str]) -> bool:
    """Operating-system litter: not the user's data, so neither accepted nor rejected."""
    return any(p.startswith(".") or p in SKIPPED_NAMES for p in parts)


def label_of(folder: str | None) -> str | None:
    return normalise_label(folder) if folder else None


def display(name: str) -> str:
    return name if len(name) <= 1000 else name[:997] + "..."


# --------------------------------------------------------------------------- reading

def read_capped(content: Content, cap: int) -> bytes:
    """At most ``cap`` bytes of ``content`` or ``Reject('too_large')``: never more in memory."""
    if isinstance(content, bytes | bytearray | memoryview):
        data = bytes(content)
    elif isinstance(content, Path):
        try:
            if content.stat().st_size > cap:
                raise Reject("too_large", too_large_msg(cap))
            with open(content, "rb") as f:
                data = f.read(cap + 1)
        except FileNotFoundError:
            raise Reject("not_found", f"No such file: {content}") from None
        except IsADirectoryError:
            raise Reject("not_audio", "This is a folder, not a file.") from None
    else:
        buf = bytearray()
        while len(buf) <= cap:
            block = content.read(min(CHUNK, cap + 1 - len(buf)))
            if not block:
                break
            buf += block
        data = bytes(buf)
    if len(data) > cap:
        raise Reject("too_large", too_large_msg(cap))
    return data


def too_large_msg(cap: int) -> str:
    return f"The file is larger than the {cap // MIB} MiB limit for one clip."


# --------------------------------------------------------------------------- the checks

class FileChecks:
    """The checks of one upload. Holds the hashes accepted so far (``seen``: sha256 → name),
    so a second copy in the same batch is a ``duplicate``; the store checks against earlier
    uploads."""

    def __init__(self, settings: Settings, label: str | None,
                 in_test_set: InTestSet | None = None):
        self.settings = settings
        self.label = label
        self.in_test_set = in_test_set
        self.clip_cap = settings.max_clip_mb * MIB
        self.clip_seconds = FeatureConfig().clip_seconds
        self.seen: dict[str, str] = {}

    def check(self, result: FileResult, parts: list[str], data: bytes,
              fallback_label: str | None) -> str:
        """Raises the first problem found (``Reject`` or ``AudioError``); returns the extension
        to store the file under."""
        ext = Path(parts[-1]).suffix.lower()
        if ext and ext not in datasets.AUDIO_EXTENSIONS:
            raise Reject("not_audio", f"'{ext}' is not an audio file type (expected one of "
                         f"{', '.join(sorted(datasets.AUDIO_EXTENSIONS))}).")
        result.size_bytes = len(data)
        if not data:
            raise Reject("empty", "The file is empty.")
        result.sha256 = hashlib.sha256(data).hexdigest()
        label = self.label or (label_of(parts[-2]) if len(parts) > 1 else None) or fallback_label
        if label is None:
            folder = parts[-2] if len(parts) > 1 else None
            where = f"folder '{folder}' is not a class" if folder else "it is not in a folder"
            raise Reject("unknown_label", f"No label: {where}. Put files in folders named after "
                         f"their class ({', '.join(CLASSES)}) or give a label.")
        result.label = label
        if result.sha256 in self.seen:
            raise Reject("duplicate", f"Same content as {self.seen[result.sha256]} in this "
                         "upload.")
        why = self.in_test_set(result.sha256, parts[-1]) if self.in_test_set else None
        if why:
            raise Reject("in_test_set", why)
        return self._check_audio(result, data)

    def _check_audio(self, result: FileResult, data: bytes) -> str:
        """The clip must be one training can use: ``decode`` + ``check_samples`` are exactly
        what ``load_clip`` runs, so anything accepted here loads at training time."""
        info = probe(data)
        result.sample_rate, result.channels = info.samplerate, info.channels
        result.duration_s = round(info.duration, 6)
        result.format = f"{info.format}/{info.subtype}"[:32]
        s = self.settings
        if not MIN_RATE <= info.samplerate <= MAX_RATE:
            raise Reject("bad_rate", f"Sample rate {info.samplerate} Hz is outside "
                         f"{MIN_RATE}-{MAX_RATE} Hz.")
        if info.frames <= 0:
            raise Reject("empty", "The file contains no audio samples.")
        if info.duration > s.max_clip_seconds:
            raise Reject("too_long", f"The clip lasts {info.duration:.1f} s; at most "
                         f"{s.max_clip_seconds:g} s is accepted.")
        if info.duration < s.min_clip_seconds:
            raise Reject("too_short", f"The clip lasts {1000 * info.duration:.0f} ms; at "
                         f"least {1000 * s.min_clip_seconds:.0f} ms is needed.")
        samples, sr = decode(data, max_seconds=self.clip_seconds)
        check_samples(to_mono(samples), sr, s.min_clip_seconds)
        return FORMAT_EXTENSIONS.get(info.format, f".{info.format.lower()}")
