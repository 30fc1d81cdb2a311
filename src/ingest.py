"""Upload ingestion: many files (or zip archives) in, accepted clips stored and recorded.

Used by the web app (bulk upload) and the CLI (``urbansound data upload``). The guarantees:

* Every file gets a verdict. Accepted ones are stored and recorded; rejected ones come back
  (and are recorded in ``upload_rejects``) with a stable ``code`` and a message for people.
  Codes: ``not_found``, ``empty``, ``too_large``, ``not_audio``, ``undecodable``, ``bad_rate``,
  ``bad_channels``, ``too_short``, ``too_long``, ``silent``, ``non_finite``, ``unknown_label``,
  ``duplicate``, ``in_test_set`` (belongs to the quality gate's test set), ``unsafe_path``,
  ``nested_archive``, ``unsupported_archive``, ``bad_archive``, ``too_many_files``,
  ``archive_too_large``.
* Nothing accepted is lost and nothing half-done is left: files are staged (fsynced) while
  they are checked, then moved into place with ``os.replace`` and recorded in one transaction;
  if that transaction fails, the files it placed are removed again. Files are written before
  the commit, so a crash can at worst leave an unrecorded file (adopted by the next upload of
  the same content), never a recorded clip without its file.
* Deduplication is by sha256 of the bytes, within the batch and against every accepted clip.
  The check, the file moves and the commit run under one lock (a Postgres advisory lock, or a
  file lock next to the uploads for SQLite), so concurrent uploads of the same file from two
  web replicas cannot both be accepted, nor can one delete the other's file on failure.
* Archives are hostile until proven otherwise: names are checked (``..``, absolute paths, drive
  letters; backslashes are read as separators), symlinks and nested archives are refused, the
  member count is checked before the central directory is parsed, and decompressed bytes are
  counted as they are produced, so a zip bomb costs at most ``max_clip_mb`` per member and
  ``max_archive_bytes_mb`` per archive whatever its headers claim.

Stored layout: ``uploads_dir/<label>/<sha256[:16]><ext>`` (a class-per-folder data set that
``src.datasets.read_dataset`` can read too); ``clips.path`` is relative to ``uploads_dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import struct
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import datasets
from .db import (
    ClipRole,
    JobStatus,
    TrainingJob,
    Upload,
    UploadedClip,
    UploadReject,
    UploadSource,
)
from .db import session_scope as _session_scope
from .errors import UserError
from .files import fsync_dir
from .preprocessing import (
    CLASSES,
    AudioError,
    FeatureConfig,
    check_samples,
    decode,
    normalise_label,
    probe,
    to_mono,
)
from .settings import Settings, get_settings

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 8_000, 192_000
MIB = 1 << 20
CHUNK = 1 << 20
ARCHIVE_EXTENSIONS = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".zst",
                      ".7z", ".rar", ".lz", ".lzma", ".z", ".cab", ".jar", ".war", ".iso"}
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07",
                 b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
SKIPPED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
FORMAT_EXTENSIONS = {"WAV": ".wav", "WAVEX": ".wav", "FLAC": ".flac", "OGG": ".ogg",
                     "MP3": ".mp3", "MPEG": ".mp3", "AIFF": ".aiff", "AU": ".au",
                     "W64": ".w64", "RF64": ".rf64"}
_DRIVE = re.compile(r"^[A-Za-z]:")
_LOCK_KEY = 0x55_53_38_4B  # "US8K": the advisory lock id of ingestion
# Central directory entries are >= 46 bytes plus the name; 4 KiB per member is generous.
_CD_BYTES_PER_MEMBER = 4096

Content = bytes | Path | IO[bytes]
Item = Path | tuple[str, Content]


class IngestError(UserError, ValueError):
    """The whole request is unusable (no files, an unknown explicit label...)."""


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


@dataclass
class IngestReport:
    upload_id: int | None
    source: str
    client: str
    results: list[FileResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # dotfiles, __MACOSX/: not counted

    @property
    def accepted(self) -> list[FileResult]:
        return [r for r in self.results if r.accepted]

    @property
    def rejected(self) -> list[FileResult]:
        return [r for r in self.results if not r.accepted]

    @property
    def n_files(self) -> int:
        return len(self.results)

    @property
    def n_accepted(self) -> int:
        return len(self.accepted)

    @property
    def n_rejected(self) -> int:
        return len(self.rejected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "upload_id": self.upload_id,
            "source": self.source,
            "client": self.client,
            "n_files": self.n_files,
            "n_accepted": self.n_accepted,
            "n_rejected": self.n_rejected,
            "accepted": [r.to_dict() for r in self.accepted],
            "rejected": [r.to_dict() for r in self.rejected],
            "skipped": list(self.skipped),
        }


class _Reject(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _ArchiveAbort(Exception):
    """Stops reading an archive altogether; everything taken from it is discarded."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Staged:
    result: FileResult
    staged: Path
    ext: str


# --------------------------------------------------------------------------- names

def _split_name(name: str) -> list[str]:
    """Path components of an uploaded name, or ``_Reject('unsafe_path')``.

    Names are never used to build a path on disk (files are stored by label and hash), but a
    name that climbs out of its folder is a sign of a crafted archive and is refused."""
    norm = name.replace("\\", "/")
    if "\x00" in norm:
        raise _Reject("unsafe_path", "The name contains a NUL byte.")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise _Reject("unsafe_path", "Absolute paths are not allowed in uploads.")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Reject("unsafe_path", "'..' in a name could escape the upload folder.")
    if not parts:
        raise _Reject("unsafe_path", "The name is empty.")
    return parts


def _skippable(parts: list[str]) -> bool:
    """Operating-system litter: not the user's data, so neither accepted nor rejected."""
    return any(p.startswith(".") or p in SKIPPED_NAMES for p in parts)


def _label_of(folder: str | None) -> str | None:
    return normalise_label(folder) if folder else None


def _display(name: str) -> str:
    return name if len(name) <= 1000 else name[:997] + "..."


# --------------------------------------------------------------------------- reading

def _read_capped(content: Content, cap: int) -> bytes:
    """At most ``cap`` bytes of ``content`` or ``_Reject('too_large')``: never more in memory."""
    if isinstance(content, bytes | bytearray | memoryview):
        data = bytes(content)
    elif isinstance(content, Path):
        try:
            if content.stat().st_size > cap:
                raise _Reject("too_large", _too_large_msg(cap))
            with open(content, "rb") as f:
                data = f.read(cap + 1)
        except FileNotFoundError:
            raise _Reject("not_found", f"No such file: {content}") from None
        except IsADirectoryError:
            raise _Reject("not_audio", "This is a folder, not a file.") from None
    else:
        buf = bytearray()
        while len(buf) <= cap:
            block = content.read(min(CHUNK, cap + 1 - len(buf)))
            if not block:
                break
            buf += block
        data = bytes(buf)
    if len(data) > cap:
        raise _Reject("too_large", _too_large_msg(cap))
    return data


def _too_large_msg(cap: int) -> str:
    return f"The file is larger than the {cap // MIB} MiB limit for one clip."


def _is_archive_magic(head: bytes) -> bool:
    return any(head.startswith(m) for m in ARCHIVE_MAGIC) or head[257:262] == b"ustar"


def _declared_entries(fh: IO[bytes]) -> tuple[int, int] | None:
    """(entry count, central directory size) from the end-of-central-directory record.

    Read before ``zipfile`` parses the central directory: a 200 MB archive can declare
    millions of empty members, and building millions of ``ZipInfo`` objects is the attack."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    tail_len = min(size, 65_535 + 22)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) < i + 22:
        return None
    total, cd_size = struct.unpack("<HI", tail[i + 10 : i + 16])
    j = i - 20
    if (total == 0xFFFF or cd_size == 0xFFFFFFFF) and j >= 0 and tail[j : j + 4] == b"PK\x06\x07":
        (offset,) = struct.unpack("<Q", tail[j + 8 : j + 16])
        fh.seek(offset)
        rec = fh.read(56)
        if rec[:4] == b"PK\x06\x06" and len(rec) == 56:
            total, cd_size = struct.unpack("<QQ", rec[32:48])
    fh.seek(0)
    return total, cd_size


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


# --------------------------------------------------------------------------- the batch

class _Batch:
    """Validates and stages one upload. Holds real state: the staged files, the hashes seen
    so far (in-batch duplicates) and the verdicts in input order."""

    def __init__(self, settings: Settings, label: str | None, staging: Path,
                 in_test_set: Callable[[str, str], str | None] | None = None):
        self.settings = settings
        self.label = label
        self.in_test_set = in_test_set
        self.staging = staging
        self.clip_cap = settings.max_clip_mb * MIB
        self.results: list[FileResult] = []
        self.skipped: list[str] = []
        self.staged: list[_Staged] = []
        self.shas: dict[str, str] = {}  # sha256 -> name, accepted files only
        self.clip_seconds = FeatureConfig().clip_seconds

    # ---------------------------------------------------------------- entry points

    def add(self, item: Item) -> None:
        if isinstance(item, Path):
            name = f"{item.parent.name}/{item.name}" if item.parent.name else item.name
            content: Content = item
        else:
            name, content = item
            name = str(name)
        try:
            parts = _split_name(name)
        except _Reject as rej:
            self._reject(FileResult(_display(name)), rej.code, rej.message)
            return
        if _skippable(parts):
            self.skipped.append(_display(name))
            return
        ext = Path(parts[-1]).suffix.lower()
        if ext == ".zip" or (not ext and self._peek_zip(content)):
            self._add_zip(_display(name), parts, content)
        elif ext in ARCHIVE_EXTENSIONS:
            self._reject(FileResult(_display(name)), "unsupported_archive",
                         "Only .zip archives are expanded; upload a zip or the files.")
        else:
            result = FileResult(_display(name))
            try:
                data = _read_capped(content, self.clip_cap)
            except _Reject as rej:
                self._reject(result, rej.code, rej.message)
                return
            self._add_file(result, parts, data, None, in_archive=False)

    @staticmethod
    def _peek_zip(content: Content) -> bool:
        if isinstance(content, bytes | bytearray):
            return bytes(content[:4]) == b"PK\x03\x04"
        if isinstance(content, Path):
            try:
                with open(content, "rb") as f:
                    return f.read(4) == b"PK\x03\x04"
            except OSError:
                return False
        if content.seekable():
            pos = content.tell()
            head = content.read(4)
            content.seek(pos)
            return head == b"PK\x03\x04"
        return False

    # ---------------------------------------------------------------- verdicts

    def _reject(self, result: FileResult, code: str, message: str) -> None:
        result.accepted, result.code, result.message = False, code, message
        self.results.append(result)

    def _add_file(self, result: FileResult, parts: list[str], data: bytes,
                  fallback_label: str | None, in_archive: bool) -> None:
        try:
            ext = self._check_file(result, parts, data, fallback_label, in_archive)
        except _Reject as rej:
            self._reject(result, rej.code, rej.message)
            return
        except AudioError as exc:
            self._reject(result, exc.code, exc.message)
            return
        staged = self.staging / f"{len(self.staged):06d}{ext}"
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        result.accepted = True
        self.shas[result.sha256 or ""] = result.name
        self.results.append(result)
        self.staged.append(_Staged(result, staged, ext))

    def _check_file(self, result: FileResult, parts: list[str], data: bytes,
                    fallback_label: str | None, in_archive: bool) -> str:
        """Raises the first problem found; returns the extension to store the file under."""
        ext = Path(parts[-1]).suffix.lower()
        if ext in ARCHIVE_EXTENSIONS or (in_archive and _is_archive_magic(data[:512])):
            raise _Reject("nested_archive", "Archives inside archives are not expanded.")
        if ext and ext not in datasets.AUDIO_EXTENSIONS:
            raise _Reject("not_audio", f"'{ext}' is not an audio file type (expected one of "
                          f"{', '.join(sorted(datasets.AUDIO_EXTENSIONS))}).")
        result.size_bytes = len(data)
        if not data:
            raise _Reject("empty", "The file is empty.")
        result.sha256 = hashlib.sha256(data).hexdigest()
        label = self.label or (_label_of(parts[-2]) if len(parts) > 1 else None) or fallback_label
        if label is None:
            folder = parts[-2] if len(parts) > 1 else None
            where = f"folder '{folder}' is not a class" if folder else "it is not in a folder"
            raise _Reject("unknown_label", f"No label: {where}. Put files in folders named after "
                          f"their class ({', '.join(CLASSES)}) or give a label.")
        result.label = label
        if result.sha256 in self.shas:
            raise _Reject("duplicate", f"Same content as {self.shas[result.sha256]} in this "
                          "upload.")
        why = self.in_test_set(result.sha256, parts[-1]) if self.in_test_set else None
        if why:
            raise _Reject("in_test_set", why)
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
            raise _Reject("bad_rate", f"Sample rate {info.samplerate} Hz is outside "
                          f"{MIN_RATE}-{MAX_RATE} Hz.")
        if info.frames <= 0:
            raise _Reject("empty", "The file contains no audio samples.")
        if info.duration > s.max_clip_seconds:
            raise _Reject("too_long", f"The clip lasts {info.duration:.1f} s; at most "
                          f"{s.max_clip_seconds:g} s is accepted.")
        if info.duration < s.min_clip_seconds:
            raise _Reject("too_short", f"The clip lasts {1000 * info.duration:.0f} ms; at "
                          f"least {1000 * s.min_clip_seconds:.0f} ms is needed.")
        samples, sr = decode(data, max_seconds=self.clip_seconds)
        check_samples(to_mono(samples), sr, s.min_clip_seconds)
        return FORMAT_EXTENSIONS.get(info.format, f".{info.format.lower()}")

    # ---------------------------------------------------------------- archives

    def _add_zip(self, name: str, parts: list[str], content: Content) -> None:
        mark = (len(self.results), len(self.staged), len(self.skipped))
        fallback = (self.label or _label_of(Path(parts[-1]).stem)
                    or (_label_of(parts[-2]) if len(parts) > 1 else None))
        try:
            with self._open_archive(content) as fh:
                self._expand_zip(name, fh, fallback)
            if len(self.results) == mark[0] and len(self.skipped) == mark[2]:
                raise _ArchiveAbort("empty", "The archive holds no files.")
        except _ArchiveAbort as abort:
            for staged in self.staged[mark[1]:]:
                staged.staged.unlink(missing_ok=True)
            del self.results[mark[0]:], self.staged[mark[1]:], self.skipped[mark[2]:]
            self.shas = {s.result.sha256 or "": s.result.name for s in self.staged}
            self._reject(FileResult(name), abort.code, abort.message)

    @contextlib.contextmanager
    def _open_archive(self, content: Content) -> Iterator[IO[bytes]]:
        if isinstance(content, bytes | bytearray):
            yield io.BytesIO(content)
        elif isinstance(content, Path):
            try:
                f = open(content, "rb")  # noqa: SIM115 - closed below, after the yield
            except OSError as exc:
                raise _ArchiveAbort("not_found", f"Cannot open {content}: {exc}") from None
            with f:
                yield f
        elif content.seekable():
            yield content
        else:  # zip needs random access: spool a non-seekable stream, bounded
            spooled = self.staging / f"archive-{uuid.uuid4().hex}.zip"
            cap = self.settings.max_upload_mb * MIB
            with open(spooled, "w+b") as f:
                n = 0
                while block := content.read(CHUNK):
                    n += len(block)
                    if n > cap:
                        raise _ArchiveAbort("too_large", f"The archive is larger than the "
                                            f"{cap // MIB} MiB upload limit.")
                    f.write(block)
                f.seek(0)
                yield f

    def _expand_zip(self, name: str, fh: IO[bytes], fallback: str | None) -> None:
        s = self.settings
        too_many = _ArchiveAbort("too_many_files", f"The archive holds more than "
                                 f"{s.max_archive_members} files; split it.")
        try:
            declared = _declared_entries(fh)
        except (OSError, struct.error, ValueError):
            declared = None
        if declared is not None and (
            declared[0] > s.max_archive_members
            or declared[1] > s.max_archive_members * _CD_BYTES_PER_MEMBER
        ):
            raise too_many
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
                NotImplementedError, struct.error) as exc:
            raise _ArchiveAbort("bad_archive", f"Not a readable zip archive ({exc}).") from None
        with zf:
            infos = zf.infolist()
            if len(infos) > s.max_archive_members:
                raise too_many
            budget = s.max_archive_bytes_mb * MIB
            for info in infos:
                if info.is_dir():
                    continue
                budget -= self._zip_member(name, zf, info, fallback, budget)

    def _zip_member(self, archive: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                    fallback: str | None, budget: int) -> int:
        """Judge one member; returns the bytes it decompressed (charged to the archive)."""
        result = FileResult(_display(f"{archive}/{info.filename}"))
        try:
            parts = _split_name(info.filename)
            if _skippable(parts):
                self.skipped.append(result.name)
                return 0
            if _is_symlink(info):
                raise _Reject("unsafe_path", "Symbolic links are not allowed in archives.")
            ext = Path(parts[-1]).suffix.lower()
            if ext in ARCHIVE_EXTENSIONS:
                raise _Reject("nested_archive", "Archives inside archives are not expanded.")
            if ext and ext not in datasets.AUDIO_EXTENSIONS:
                raise _Reject("not_audio", f"'{ext}' is not an audio file type.")
            if info.flag_bits & 0x1:
                raise _Reject("undecodable", "The member is encrypted.")
        except _Reject as rej:
            self._reject(result, rej.code, rej.message)
            return 0
        data, used = self._read_member(zf, info, budget)
        if isinstance(data, _Reject):
            self._reject(result, data.code, data.message)
        else:
            self._add_file(result, parts, data, fallback, in_archive=True)
        return used

    def _read_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                     budget: int) -> tuple[bytes | _Reject, int]:
        """Decompress in chunks, counting what is actually produced: header sizes lie."""
        buf = bytearray()
        try:
            with zf.open(info) as member:
                while block := member.read(CHUNK):
                    buf += block
                    if len(buf) > budget:
                        raise _ArchiveAbort(
                            "archive_too_large", "The archive decompresses to more than "
                            f"{self.settings.max_archive_bytes_mb} MiB; split it.")
                    if len(buf) > self.clip_cap:
                        return _Reject("too_large", _too_large_msg(self.clip_cap)), len(buf)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
                RuntimeError, ValueError) as exc:
            return _Reject("bad_archive", f"The member is corrupt ({exc})."), len(buf)
        return bytes(buf), len(buf)


# --------------------------------------------------------------------------- commit

@contextlib.contextmanager
def _ingest_lock(session: Session, settings: Settings) -> Iterator[None]:
    """Serialise the dedupe-check → move → commit step across processes (see module doc)."""
    engine = session.get_bind().engine
    if engine.dialect.name == "postgresql":
        conn = engine.connect()  # its own connection: the lock must outlive rollbacks
        try:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            yield
        finally:
            try:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                conn.rollback()
                conn.close()
            except Exception:  # a dead connection releases the lock by itself
                conn.invalidate()
                conn.close()
    else:
        settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        with open(settings.uploads_dir / ".ingest.lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)




def _existing(session: Session, shas: list[str]) -> dict[str, UploadedClip]:
    found: dict[str, UploadedClip] = {}
    for i in range(0, len(shas), 500):
        for clip in session.scalars(
            sa.select(UploadedClip).where(UploadedClip.sha256.in_(shas[i : i + 500]))
        ):
            found[clip.sha256] = clip
    return found


def _commit(session: Session, batch: _Batch, settings: Settings, source: str,
            client: str) -> IngestReport:
    report = IngestReport(None, source, client, batch.results, batch.skipped)
    root = settings.uploads_dir
    with _ingest_lock(session, settings):
        known = _existing(session, [s.result.sha256 or "" for s in batch.staged])
        keep: list[_Staged] = []
        for staged in batch.staged:
            prior = known.get(staged.result.sha256 or "")
            if prior is None:
                keep.append(staged)
                continue
            r = staged.result
            r.accepted, r.code = False, "duplicate"
            r.message = (f"Already uploaded on {prior.created_at:%Y-%m-%d} as "
                         f"{prior.original_name} (clip {prior.id}, label {prior.label}).")
        upload = Upload(source=source, client=client[:200], n_files=report.n_files,
                        n_accepted=report.n_accepted, n_rejected=report.n_rejected)
        session.add(upload)
        rows: list[tuple[FileResult, UploadedClip]] = []
        for r in report.rejected:
            session.add(UploadReject(upload=upload, original_name=r.name, reason_code=r.code,
                                     message=r.message, sha256=r.sha256,
                                     size_bytes=r.size_bytes))
        for staged in keep:
            r = staged.result
            r.path = f"{r.label}/{(r.sha256 or '')[:16]}{staged.ext}"
            row = UploadedClip(upload=upload, original_name=r.name, path=r.path,
                               label=r.label, sha256=r.sha256, duration_s=r.duration_s,
                               sample_rate=r.sample_rate, channels=r.channels,
                               format=r.format, size_bytes=r.size_bytes)
            session.add(row)
            rows.append((r, row))
        placed: list[Path] = []
        try:
            session.flush()
            for staged in keep:
                target = root / (staged.result.path or "")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged.staged, target)  # an existing file here is an orphan
                placed.append(target)
            for folder in {p.parent for p in placed}:
                fsync_dir(folder)
            session.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                session.rollback()
            for path in placed:
                path.unlink(missing_ok=True)
            for r, _ in rows:
                r.path = None
            raise
    report.upload_id = upload.id
    for r, row in rows:
        r.clip_id = row.id
    log.info("upload %s (%s, %s): %d accepted, %d rejected", upload.id, source, client or "-",
             report.n_accepted, report.n_rejected)
    return report


def _sweep_staging(incoming: Path, max_age_s: float = 86_400) -> None:
    """Staging folders of processes killed mid-upload; a day old means nobody owns them."""
    if not incoming.is_dir():
        return
    cutoff = time.time() - max_age_s
    for folder in incoming.iterdir():
        with contextlib.suppress(OSError):
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)


def find_orphans(session: Session, settings: Settings | None = None,
                 remove: bool = False) -> list[Path]:
    """Stored files no clip row points at: what a crash between the file move and the commit
    leaves behind (harmless: a re-upload adopts them). ``remove=True`` deletes them, under the
    ingest lock so an upload in progress is never touched."""
    settings = settings or get_settings()
    root = settings.uploads_dir
    if not root.is_dir():
        return []
    with _ingest_lock(session, settings):
        known = set(session.scalars(sa.select(UploadedClip.path)))
        orphans = [p for p in sorted(root.glob("*/*"))
                   if p.is_file() and not p.parent.name.startswith(".")
                   and p.relative_to(root).as_posix() not in known]
        if remove:
            for path in orphans:
                path.unlink(missing_ok=True)
    return orphans


def ingest(
    items: Iterable[Item],
    *,
    label: str | None = None,
    source: str = "cli",
    client: str = "",
    session: Session | None = None,
    settings: Settings | None = None,
    in_test_set: Callable[[str, str], str | None] | None = None,
) -> IngestReport:
    """Check, store and record a batch of uploaded files; returns a verdict for every file.

    ``items``: paths (label = the parent folder's name) or ``(name, content)`` pairs, where
    ``name`` may carry folders (``"dog_bark/x.wav"``, as browsers send for folder uploads) and
    ``content`` is bytes, a path or a binary file object. ``.zip`` items are expanded; a member
    at the root of an archive takes its label from the archive's name or folder. ``label``
    overrides every folder name. ``session``: the unit of work to use; ingest commits (or rolls
    back) it itself, because the files on disk must follow the rows. Without one, a session on
    ``settings.db_url`` is opened.

    ``in_test_set(sha256, name)`` says why a file belongs to the quality gate's test set (the
    leakage guard, ``retrain_data.guard``, by default): such a file is refused, or the gate
    would grade the model on clips it trained on.

    Raises ``IngestError`` for an unusable request (nothing to ingest, unknown ``label``),
    ``DatabaseUnavailable`` if the database cannot be reached (nothing is stored then).
    """
    settings = settings or get_settings()
    try:
        source = UploadSource(source).value
    except ValueError:
        raise IngestError(f"Unknown upload source {source!r}.") from None
    explicit = None
    if label is not None and str(label).strip():
        explicit = normalise_label(str(label))
        if explicit is None:
            raise IngestError(f"Unknown label {label!r}; expected one of: {', '.join(CLASSES)}.")
    _sweep_staging(settings.uploads_dir / ".incoming")
    staging = settings.uploads_dir / ".incoming" / uuid.uuid4().hex
    staging.mkdir(parents=True, exist_ok=True)
    try:
        if in_test_set is None:
            from .retrain_data import guard  # it reads uploads through this module

            in_test_set = guard(settings).check
        batch = _Batch(settings, explicit, staging, in_test_set)
        for item in items:
            batch.add(item)
        if not batch.results:
            raise IngestError("No files to ingest" + (
                f" (only {len(batch.skipped)} hidden/system files)." if batch.skipped else "."))
        if session is not None:
            return _commit(session, batch, settings, source, client)
        with _session_scope(settings.db_url) as own:
            return _commit(own, batch, settings, source, client)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- retraining

def _unused_query() -> sa.Select:
    succeeded = sa.select(TrainingJob.id).where(TrainingJob.status == JobStatus.succeeded)
    return (
        sa.select(UploadedClip)
        .where(sa.or_(UploadedClip.used_in_job_id.is_(None),
                      UploadedClip.used_in_job_id.not_in(succeeded)),
               sa.or_(UploadedClip.role.is_(None), UploadedClip.role != ClipRole.test))
        .order_by(UploadedClip.id)
    )


def unused_clips(session: Session, limit: int | None = None) -> list[UploadedClip]:
    """Accepted clips no successful retrain has absorbed yet (failed or rejected jobs do not
    count: their model was never served, so the data still waits to be learnt). Clips held
    out as the gate's test set never train, so they never wait."""
    query = _unused_query()
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def count_unused(session: Session) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(_unused_query().subquery())) or 0


def mark_used(session: Session, clip_ids: Iterable[int], job_id: str) -> int:
    """Record that ``job_id`` trained on these clips; flushes, the caller commits (ideally in
    the same transaction that marks the job succeeded, so a retried task cannot half-apply).
    Returns the number of clips marked."""
    ids = list(clip_ids)
    n = 0
    for i in range(0, len(ids), 500):
        res = session.execute(
            sa.update(UploadedClip)
            .where(UploadedClip.id.in_(ids[i : i + 500]))
            .values(used_in_job_id=job_id)
            .execution_options(synchronize_session="fetch")
        )
        n += res.rowcount or 0
    session.flush()
    return n


def upload_group(row: UploadedClip) -> str:
    """The recording an upload came from: the fsID for files named like UrbanSound8K slices
    (siblings then stay on one side of every split), else its content hash (each upload its
    own recording)."""
    stem = Path(row.original_name.replace("\\", "/").rsplit("/", 1)[-1]).stem
    match = datasets.US8K_NAME.match(stem)
    return match.group("fsid") if match else row.sha256


def clips_as_dataset(
    clips: Iterable[UploadedClip], uploads_dir: Path | None = None
) -> list[datasets.Clip]:
    """Database rows → the ``Clip`` records the trainer takes, grouped by ``upload_group``.
    Rows whose file has gone missing are left out with a warning rather than sinking a job.
    """
    root = uploads_dir or get_settings().uploads_dir
    out = []
    for c in clips:
        path = root / c.path
        if not path.is_file():
            log.warning("clip %s: file %s is missing; left out", c.id, path)
            continue
        out.append(datasets.Clip(path, c.label, None, upload_group(c), "upload"))
    return out


def upload_stats(session: Session) -> dict[str, Any]:
    """Counts for the UI and ``urbansound data stats``: per class, and how many wait."""
    per_class = dict(session.execute(
        sa.select(UploadedClip.label, sa.func.count()).group_by(UploadedClip.label)
        .order_by(UploadedClip.label)
    ).tuples().all())
    rejects = dict(session.execute(
        sa.select(UploadReject.reason_code, sa.func.count()).group_by(UploadReject.reason_code)
        .order_by(UploadReject.reason_code)
    ).tuples().all())
    return {
        "n_uploads": session.scalar(sa.select(sa.func.count()).select_from(Upload)) or 0,
        "n_clips": sum(per_class.values()),
        "n_unused": count_unused(session),
        "per_class": per_class,
        "rejects": rejects,
    }
