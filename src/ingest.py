"""Upload ingestion: many files (or zip archives) in, accepted clips stored and recorded.

Used by the web app (bulk upload) and the CLI (``urbansound data upload``). The checks live
next door: ``src.upload_checks`` judges each file, ``src.archives`` reads zip archives
defensively; this module is the store and the public ``ingest()``. The guarantees:

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
* Archives are hostile until proven otherwise (see ``src.archives``): an archive refused as a
  whole takes back everything read from it.

Stored layout: ``uploads_dir/<label>/<sha256[:16]><ext>`` (a class-per-folder data set that
``src.datasets.read_dataset`` can read too); ``clips.path`` is relative to ``uploads_dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from . import archives, datasets
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
from .preprocessing import CLASSES, AudioError, normalise_label
from .settings import Settings, get_settings
from .testset import guard
from .upload_checks import (
    MIB,
    Content,
    FileChecks,
    FileResult,
    InTestSet,
    Reject,
    display,
    label_of,
    read_capped,
    skippable,
    split_name,
)

log = logging.getLogger(__name__)

_LOCK_KEY = 0x55_53_38_4B  # "US8K": the advisory lock id of ingestion

Item = Path | tuple[str, Content]


class IngestError(UserError, ValueError):
    """The whole request is unusable (no files, an unknown explicit label...)."""


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


@dataclass
class _Staged:
    result: FileResult
    staged: Path
    ext: str


# --------------------------------------------------------------------------- the batch

class _Batch:
    """Validates and stages one upload. Holds real state: the staged files, the checks (with
    the hashes seen so far, for in-batch duplicates) and the verdicts in input order."""

    def __init__(self, settings: Settings, label: str | None, staging: Path,
                 in_test_set: InTestSet | None = None):
        self.settings = settings
        self.label = label
        self.staging = staging
        self.checks = FileChecks(settings, label, in_test_set)
        self.results: list[FileResult] = []
        self.skipped: list[str] = []
        self.staged: list[_Staged] = []

    def add(self, item: Item) -> None:
        if isinstance(item, Path):
            name = f"{item.parent.name}/{item.name}" if item.parent.name else item.name
            content: Content = item
        else:
            name, content = item
            name = str(name)
        try:
            parts = split_name(name)
        except Reject as rej:
            self._reject(FileResult(display(name)), rej.code, rej.message)
            return
        if skippable(parts):
            self.skipped.append(display(name))
            return
        ext = Path(parts[-1]).suffix.lower()
        if ext == ".zip" or (not ext and archives.is_zip(content)):
            self._add_zip(display(name), parts, content)
        elif ext in archives.ARCHIVE_EXTENSIONS:
            self._reject(FileResult(display(name)), "unsupported_archive",
                         "Only .zip archives are expanded; upload a zip or the files.")
        else:
            result = FileResult(display(name))
            try:
                data = read_capped(content, self.checks.clip_cap)
            except Reject as rej:
                self._reject(result, rej.code, rej.message)
                return
            self._add_file(result, parts, data, None)

    def _reject(self, result: FileResult, code: str, message: str) -> None:
        result.accepted, result.code, result.message = False, code, message
        self.results.append(result)

    def _add_file(self, result: FileResult, parts: list[str], data: bytes,
                  fallback_label: str | None) -> None:
        try:
            ext = self.checks.check(result, parts, data, fallback_label)
        except (Reject, AudioError) as exc:
            self._reject(result, exc.code, exc.message)
            return
        staged = self.staging / f"{len(self.staged):06d}{ext}"
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        result.accepted = True
        self.checks.seen[result.sha256 or ""] = result.name
        self.results.append(result)
        self.staged.append(_Staged(result, staged, ext))

    def _add_zip(self, name: str, parts: list[str], content: Content) -> None:
        """Every member gets its verdict; an archive refused as a whole takes back all of
        them and gets one verdict of its own."""
        mark = (len(self.results), len(self.staged), len(self.skipped))
        fallback = (self.label or label_of(Path(parts[-1]).stem)
                    or (label_of(parts[-2]) if len(parts) > 1 else None))
        try:
            cap = self.settings.max_upload_mb * MIB
            with archives.open_archive(content, self.staging, cap) as fh:
                for member in archives.zip_members(name, fh, self.settings):
                    if member.skipped:
                        self.skipped.append(member.name)
                    elif member.refused is not None:
                        self._reject(FileResult(member.name), member.refused.code,
                                     member.refused.message)
                    else:
                        self._add_file(FileResult(member.name), member.parts, member.data,
                                       fallback)
            if len(self.results) == mark[0] and len(self.skipped) == mark[2]:
                raise archives.ArchiveAbort("empty", "The archive holds no files.")
        except archives.ArchiveAbort as abort:
            for staged in self.staged[mark[1]:]:
                staged.staged.unlink(missing_ok=True)
            del self.results[mark[0]:], self.staged[mark[1]:], self.skipped[mark[2]:]
            self.checks.seen = {s.result.sha256 or "": s.result.name for s in self.staged}
            self._reject(FileResult(name), abort.code, abort.message)


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


#: In each staging folder: a file its process holds an exclusive ``flock`` on for as long as it
#: stages there. The kernel drops the lock when the process dies, however it dies (kill -9
#: included), so a folder whose lock can be taken has no live owner: no pid reuse to fool.
OWNER_FILE = ".owner"
_OWNER_GRACE_S = 5.0  # a lock file this young may be between its creation and its flock


def _claim_staging(incoming: Path) -> tuple[Path, IO[bytes]]:
    """A new staging folder under ``incoming``, locked by this process until the returned
    handle is closed."""
    staging = incoming / f"{os.getpid()}-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    owner = open(staging / OWNER_FILE, "wb")  # noqa: SIM115 - closed by ingest() when done
    fcntl.flock(owner, fcntl.LOCK_EX)
    owner.write(f"{os.getpid()}\n".encode())
    owner.flush()
    return staging, owner


def sweep_staging(settings: Settings | None = None, max_age_s: float = 86_400) -> list[Path]:
    """Remove staging folders no live process owns: what a process killed mid-upload leaves
    in ``uploads_dir/.incoming``. Safe at any time, with uploads in flight in this or any
    other process (a sibling gunicorn worker's folder is locked, so it is left alone); run at
    start-up and before every upload. A folder without a lock file (from an older version, or
    caught between its ``mkdir`` and its lock) goes only once it is ``max_age_s`` old.
    Returns the folders removed."""
    settings = settings or get_settings()
    incoming = settings.uploads_dir / ".incoming"
    if not incoming.is_dir():
        return []
    removed = []
    now = time.time()
    for folder in incoming.iterdir():
        with contextlib.suppress(OSError):
            try:
                owner = open(folder / OWNER_FILE, "rb")  # noqa: SIM115 - closed just below
            except (FileNotFoundError, NotADirectoryError):
                if folder.lstat().st_mtime < now - max_age_s:
                    _remove(folder)
                    removed.append(folder)
                continue
            with owner:
                try:
                    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive and staging there
                if os.fstat(owner.fileno()).st_mtime > now - _OWNER_GRACE_S:
                    continue  # just created: its owner may not have locked it yet
                _remove(folder)
                removed.append(folder)
    if removed:
        log.info("removed %d abandoned upload staging folder(s) in %s", len(removed), incoming)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
    in_test_set: InTestSet | None = None,
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
    leakage guard, ``testset.guard``, by default): such a file is refused, or the gate
    would grade the model on clips it trained on.

    Raises ``IngestError`` for an unusable request (nothing to ingest, unknown ``label``),
    ``DatabaseUnavailable`` if the database cannot be reached (nothing is stored then).
    """
    settings = settings or get_settings()
    try:
        source = UploadSource(source).value
    except ValueError:
        raise IngestError(f"Unknown upload source {source!r}.", code="bad_source") from None
    explicit = None
    if label is not None and str(label).strip():
        explicit = normalise_label(str(label))
        if explicit is None:
            raise IngestError(f"Unknown label {label!r}; expected one of: {', '.join(CLASSES)}.",
                              code="unknown_label")
    sweep_staging(settings)
    staging, owner = _claim_staging(settings.uploads_dir / ".incoming")
    try:
        if in_test_set is None:
            in_test_set = guard(settings).check
        batch = _Batch(settings, explicit, staging, in_test_set)
        for item in items:
            batch.add(item)
        if not batch.results:
            raise IngestError(code="no_files", message="No files to ingest" + (
                f" (only {len(batch.skipped)} hidden/system files)." if batch.skipped else "."))
        if session is not None:
            return _commit(session, batch, settings, source, client)
        with _session_scope(settings.db_url) as own:
            return _commit(own, batch, settings, source, client)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        owner.close()


# --------------------------------------------------------------------------- retraining

class UploadSplit(NamedTuple):
    """Accepted uploads as the served model sees them."""

    new: list[UploadedClip]  # waiting to be learnt
    learnt: list[UploadedClip]  # learnt by the served model or one of its ancestors
    held: list[UploadedClip]  # held out as the quality gate's test set: never trained on


def split_uploads(session: Session, lineage: Iterable[str]) -> UploadSplit:
    """The one rule for "learnt": a clip is learnt when a succeeded job that trained on it
    produced the served model or one of its ancestors (``lineage``). After a rollback, what
    only the abandoned versions learnt is new again, so the next retrain teaches it to the
    model now served; failed or rejected jobs never count (their model was never served)."""
    in_line = set(lineage)
    learnt_in_line = {job_id for job_id, version in session.execute(
        sa.select(TrainingJob.id, TrainingJob.result_version)
        .where(TrainingJob.status == JobStatus.succeeded)) if version in in_line}
    split = UploadSplit([], [], [])
    for r in session.scalars(sa.select(UploadedClip).order_by(UploadedClip.id)):
        if r.role == ClipRole.test:
            split.held.append(r)
        elif r.used_in_job_id in learnt_in_line:
            split.learnt.append(r)
        else:
            split.new.append(r)
    return split


def unused_clips(session: Session, lineage: Iterable[str]) -> list[UploadedClip]:
    """Accepted clips the served model has not learnt yet (``split_uploads``'s rule)."""
    return split_uploads(session, lineage).new


def count_unused(session: Session, lineage: Iterable[str]) -> int:
    return len(unused_clips(session, lineage))


def mark_used(session: Session, clip_ids: Iterable[int], job_id: str) -> int:
    """Record that ``job_id`` trained on these clips; flushes, the caller commits (ideally in
    the same transaction that marks the job succeeded, so a retried task cannot half-apply).
    Returns the number of clips marked."""
    ids = list(clip_ids)
    n = 0
    for i in range(0, len(ids), 500):
        res = cast(CursorResult[Any], session.execute(
            sa.update(UploadedClip)
            .where(UploadedClip.id.in_(ids[i : i + 500]))
            .values(used_in_job_id=job_id)
            .execution_options(synchronize_session="fetch")
        ))
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


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def upload_summary(row: Upload) -> dict[str, Any]:
    """One upload batch as the API and the pages show it."""
    return {"id": row.id, "created_at": _iso(row.created_at), "source": row.source,
            "client": row.client, "n_files": row.n_files, "n_accepted": row.n_accepted,
            "n_rejected": row.n_rejected}


def list_uploads(session: Session, limit: int = 50, offset: int = 0
                 ) -> tuple[list[dict[str, Any]], int]:
    """A page of upload batches, newest first, and how many there are in all."""
    total = session.scalar(sa.select(sa.func.count()).select_from(Upload)) or 0
    rows = session.scalars(sa.select(Upload).order_by(Upload.id.desc())
                           .limit(limit).offset(offset)).all()
    return [upload_summary(r) for r in rows], total


def get_upload(session: Session, upload_id: int) -> dict[str, Any] | None:
    """One batch with every file's verdict: the stored clips and the rejects with reasons."""
    row = session.get(Upload, upload_id)
    if row is None:
        return None
    out = upload_summary(row)
    out["accepted"] = [
        {"clip_id": c.id, "name": c.original_name, "label": c.label, "sha256": c.sha256,
         "duration_s": c.duration_s, "sample_rate": c.sample_rate, "channels": c.channels,
         "size_bytes": c.size_bytes, "used_in_job_id": c.used_in_job_id, "role": c.role}
        for c in sorted(row.clips, key=lambda c: c.id)]
    out["rejected"] = [
        {"name": r.original_name, "code": r.reason_code, "message": r.message}
        for r in sorted(row.rejects, key=lambda r: r.id)]
    return out


def upload_stats(session: Session, lineage: Iterable[str]) -> dict[str, Any]:
    """Counts for the UI and ``urbansound data stats``: per class, and how many wait to be
    learnt by the served model (whose ``lineage`` the caller gives: the same rule as the
    retrain plan, so the two never disagree)."""
    per_class = dict(session.execute(
        sa.select(UploadedClip.label, sa.func.count()).group_by(UploadedClip.label)
        .order_by(UploadedClip.label)
    ).all())
    rejects = dict(session.execute(
        sa.select(UploadReject.reason_code, sa.func.count()).group_by(UploadReject.reason_code)
        .order_by(UploadReject.reason_code)
    ).all())
    return {
        "n_uploads": session.scalar(sa.select(sa.func.count()).select_from(Upload)) or 0,
        "n_clips": sum(per_class.values()),
        "n_unused": count_unused(session, lineage),
        "per_class": per_class,
        "rejects": rejects,
    }
