"""The model registry: immutable version files plus one pointer naming the served version.

Layout of ``settings.models_dir``::

    <version>.pt             a checkpoint (``torch.save`` of a dict, loadable weights_only)
    <version>.rejected.json  marker: the quality gate (or a person) refused this version
    CURRENT                  JSON pointer {"version", "file", "sha256", "activated_at", ...}
    HISTORY.jsonl            one line per activation, oldest first (audit, crash fallback)

Why files and not only the database: serving must not depend on the database being up, and
a file rename is the one operation POSIX makes atomic. Promotion is therefore: write the
version file, fsync it, ``os.replace`` a fully written temporary pointer onto ``CURRENT``,
fsync the folder. A reader sees the old pointer or the new one, never a mix; a crash at any
point leaves the previous pointer, which names a complete, fsynced file. The database rows
(``model_versions``) mirror these files for history and queries when a session is given.

If ``CURRENT`` is missing or unreadable anyway (a person deleted it, a disk fault), readers
fall back to the last activated version in ``HISTORY.jsonl`` and then to the newest version
that loads and was not rejected, and say so in the log: a model is always served if one can
be. The fallback never picks a rejected version or a candidate that was never activated,
unless no version was ever activated.

The pointer records the file's sha256 and is verified before it is followed
(``check_pointer``): a file whose bytes differ from what was activated is never served, and the
fallback skips a file that no longer matches the sha256 its activation recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .files import file_sha256, fsync_dir, replace_atomically, tmp_name

if TYPE_CHECKING:  # the database is imported only where it is used
    from .db import ModelVersion

log = logging.getLogger(__name__)

FORMAT = "urbansound-ckpt/1"
REQUIRED_KEYS = ("format", "version", "parent", "created_at", "classes", "feature_config",
                 "metrics", "data")
POINTER = "CURRENT"
HISTORY = "HISTORY.jsonl"
SUFFIX = ".pt"
REJECTED_SUFFIX = ".rejected.json"
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RegistryError(UserError):
    """A registry operation that cannot be done; ``message`` says why and what to do."""

    code, status = "activation_refused", 409


@dataclass
class VersionInfo:
    """What ``list_versions`` reports for one version (file facts, then database facts)."""

    version: str
    file: str
    status: str  # active | candidate | rejected | retired | corrupt | missing
    active: bool = False
    parent: str | None = None
    created_at: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    activated_at: str | None = None
    reason: str | None = None  # why rejected
    error: str | None = None  # why unreadable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- paths and names

def _dir(models_dir: Path | None) -> Path:
    if models_dir is not None:
        return Path(models_dir)
    from .settings import get_settings

    return get_settings().models_dir


def check_version_name(version: str) -> str:
    """Names become file names and come from HTTP requests: no separators, no dot-dot start."""
    if not isinstance(version, str) or not _VERSION.match(version) or version.endswith(SUFFIX):
        raise RegistryError(
            f"Invalid version name {version!r}: use letters, digits, '.', '_' and '-' "
            "(at most 100 characters).", code="invalid_version", status=400)
    return version


def version_path(version: str, models_dir: Path | None = None) -> Path:
    return _dir(models_dir) / f"{check_version_name(version)}{SUFFIX}"


def new_version_name(now: datetime | None = None) -> str:
    """``20261126T150012Z-3fa9c1``: sorts by creation time (to the second), unique across
    workers thanks to the random suffix, readable in a directory listing."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _utc_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- durable writes



# --------------------------------------------------------------------------- checkpoints

_meta_cache: dict[tuple[str, int, int, int], dict[str, Any]] = {}
_meta_lock = threading.Lock()


def read_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's dict minus tensors, plus ``sha256``/``size_bytes``; RegistryError if
    the file is missing, not a safe checkpoint (``weights_only``) or lacks required keys.

    Cached by (path, inode, size, mtime): versions are immutable, so a hit is always right."""
    import torch

    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RegistryError(f"Model file {path} does not exist.") from None
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _meta_lock:
        if key in _meta_cache:
            return dict(_meta_cache[key])
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RegistryError(
            f"Model file {path.name} is corrupt or not a safe checkpoint: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None
    if not isinstance(ckpt, dict):
        raise RegistryError(f"Model file {path.name} is not an urbansound checkpoint.")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing or ckpt.get("format") != FORMAT:
        raise RegistryError(
            f"Model file {path.name} is not an {FORMAT} checkpoint"
            + (f" (missing {', '.join(missing)})." if missing else
               f" (format {ckpt.get('format')!r}).")
        )
    meta = {k: v for k, v in ckpt.items() if not _has_tensor(v)}
    meta["sha256"] = file_sha256(path)
    meta["size_bytes"] = st.st_size
    with _meta_lock:
        if len(_meta_cache) > 256:
            _meta_cache.clear()
        _meta_cache[key] = meta
    return dict(meta)


def version_metadata(version: str, models_dir: Path | None = None) -> dict[str, Any]:
    """``read_metadata`` of a registered version, which must say it is that version: a file
    copied or renamed by hand would otherwise be served under a false name."""
    meta = read_metadata(version_path(version, models_dir))
    if str(meta.get("version")) != version:
        raise RegistryError(
            f"Model file {version}{SUFFIX} holds version {meta.get('version')!r}; it was "
            "renamed or copied by hand."
        )
    return meta


def _has_tensor(value: Any) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_tensor(v) for v in value)
    return False


# --------------------------------------------------------------------------- pointer and history

def read_pointer(models_dir: Path | None = None) -> dict[str, Any] | None:
    """The pointer as written, or None if missing or unreadable (the caller decides)."""
    try:
        data: dict[str, Any] = json.loads((_dir(models_dir) / POINTER).read_text())
        check_version_name(data["version"])
        return data
    except (OSError, ValueError, KeyError, TypeError, RegistryError):
        return None


def current_signature(models_dir: Path | None = None) -> tuple[int, int, int] | None:
    """Changes whenever the pointer is replaced (``os.replace`` makes a new inode): one
    ``stat`` call, so a web process can poll it every request or every half second."""
    try:
        st = os.stat(_dir(models_dir) / POINTER)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_sha_cache: dict[tuple[str, int, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """``file_sha256``, remembered by (path, inode, size, mtime): a version file is hashed once
    per process, however often the pointer is checked; a file changed in place is hashed
    again (its size or mtime moved)."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _meta_lock:
        hit = _sha_cache.get(key)
    if hit is None:
        hit = file_sha256(path)
        with _meta_lock:
            if len(_sha_cache) > 256:
                _sha_cache.clear()
            _sha_cache[key] = hit
    return hit


@dataclass(frozen=True)
class PointerCheck:
    """What ``check_pointer`` found. ``state``: ``ok``; ``unreadable`` (missing, empty, not
    JSON, no valid version name or sha256); ``dangling`` (names a version whose file is
    gone); ``hash_mismatch`` (the file's sha256 is not the one the pointer recorded)."""

    state: str
    message: str
    version: str | None = None
    path: Path | None = None
    sha256: str | None = None  # as the pointer recorded it

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check_pointer(models_dir: Path | None = None) -> PointerCheck:
    """Read ``CURRENT`` and verify what it names: a valid version name, an existing file whose
    sha256 is the one recorded at activation. Nothing is loaded; the hash is computed once per
    file (``cached_sha256``). Messages name files, not full paths (readiness is public)."""
    root = _dir(models_dir)
    try:
        raw = (root / POINTER).read_bytes()
    except FileNotFoundError:
        return PointerCheck("unreadable", f"{POINTER} is missing")
    except OSError as exc:
        return PointerCheck("unreadable", f"{POINTER} is unreadable ({exc.strerror})")
    if not raw.strip():
        return PointerCheck("unreadable", f"{POINTER} is unreadable (empty)")
    try:
        data = json.loads(raw)
    except ValueError:
        return PointerCheck("unreadable", f"{POINTER} is unreadable (not valid JSON)")
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(version, str):
        return PointerCheck("unreadable", f"{POINTER} is unreadable (no version in it)")
    if not _VERSION.match(version) or version.endswith(SUFFIX):
        return PointerCheck("unreadable", f"{POINTER} is unreadable (invalid version name "
                            f"{version[:60]!r})")
    expected_file = f"{version}{SUFFIX}"
    if data.get("file", expected_file) != expected_file:
        return PointerCheck("unreadable", f"{POINTER} is unreadable (version {version} but "
                            f"file {str(data.get('file'))[:60]!r})", version)
    expected = data.get("sha256")
    if not isinstance(expected, str) or not _SHA256.match(expected):
        return PointerCheck("unreadable", f"{POINTER} is unreadable (no valid sha256 for "
                            f"{version}; activate it with `urbansound models activate`)", version)
    path = root / expected_file
    try:
        actual = cached_sha256(path) if path.is_file() else None
    except OSError:
        actual = None
    if actual is None:
        return PointerCheck("dangling", f"{POINTER} names {version}, whose file "
                            f"{expected_file} is missing", version, path)
    if actual != expected:
        return PointerCheck("hash_mismatch", f"{expected_file} has sha256 {actual[:12]}…, "
                            f"{POINTER} says {expected[:12]}…", version, path)
    return PointerCheck("ok", f"{POINTER} names {version} (sha256 verified)", version, path,
                        expected)


def pointer_signature(models_dir: Path | None = None) -> tuple[Any, ...]:
    """Changes when the pointer is replaced or the file it names appears, disappears or
    changes: one stat, one small read and one stat, cheap enough to poll twice a second."""
    root = _dir(models_dir)
    target = None
    pointer = read_pointer(root)
    if pointer is not None:
        with contextlib.suppress(OSError):
            st = os.stat(root / f"{pointer['version']}{SUFFIX}")
            target = (st.st_mtime_ns, st.st_size, st.st_ino)
    return current_signature(root), target


def _history(models_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (models_dir / HISTORY).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and isinstance(entry.get("version"), str):
                out.append(entry)
    return out


def _append_history(models_dir: Path, entry: dict[str, Any]) -> None:
    with open(models_dir / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rejection(models_dir: Path, version: str) -> dict[str, Any] | None:
    path = models_dir / f"{version}{REJECTED_SUFFIX}"
    if not path.exists():
        return None
    try:
        rejection: dict[str, Any] = json.loads(path.read_text())
        return rejection
    except (OSError, ValueError):
        return {"reason": "rejected"}


def _version_files(models_dir: Path) -> list[str]:
    """Version names on disk, oldest first (names sort by creation time)."""
    if not models_dir.is_dir():
        return []
    names = []
    for p in models_dir.iterdir():
        if p.suffix == SUFFIX and not p.name.startswith(".") and _VERSION.match(p.stem):
            names.append(p.stem)
    return sorted(names)


def _valid(models_dir: Path, version: str) -> bool:
    try:
        version_metadata(version, models_dir)
        return True
    except RegistryError:
        return False


def _fallback(models_dir: Path, why: str, exclude: str | None = None) -> tuple[str, Path]:
    on_disk = set(_version_files(models_dir)) - {exclude}
    history = _history(models_dir)
    activated = [e["version"] for e in reversed(history)]
    ordered = [v for v in dict.fromkeys(activated) if v in on_disk]
    if not ordered:  # never activated anything: the newest non-rejected version
        ordered = sorted(on_disk, reverse=True)
    recorded = {e["version"]: e.get("sha256") for e in history}  # the last activation wins
    for version in ordered:
        sha = recorded.get(version)
        try:
            changed = bool(sha) and cached_sha256(version_path(version, models_dir)) != sha
        except OSError:
            continue
        if changed:
            log.warning("model file %s%s no longer matches the sha256 recorded when it was "
                        "activated; not serving it", version, SUFFIX)
            continue
        if _rejection(models_dir, version) is None and _valid(models_dir, version):
            log.warning("model pointer %s (%s); serving %s instead", models_dir / POINTER, why,
                        version)
            return version, version_path(version, models_dir)
    raise RegistryError(
        f"No usable model in {models_dir} ({why}). Train one with `urbansound train`."
    )


def fallback(models_dir: Path | None = None, why: str = "asked for",
             exclude: str | None = None) -> tuple[str, Path]:
    """The version ``current`` falls back to when the pointer cannot be followed (skipping
    ``exclude``: a version a loader just failed to load), with a warning in the log."""
    return _fallback(_dir(models_dir), why, exclude)


def current(models_dir: Path | None = None) -> tuple[str, Path]:
    """The served version and its file.

    Follows the pointer when ``check_pointer`` verifies it (a valid name, an existing file
    with the sha256 recorded at activation; nothing is loaded, the hash is computed once per
    file). Otherwise falls back as described in the module docstring, with a warning in the
    log: a file whose bytes changed after activation is never served."""
    root = _dir(models_dir)
    check = check_pointer(root)
    if check.ok and check.version is not None and check.path is not None:
        return check.version, check.path
    return _fallback(root, check.message)


# --------------------------------------------------------------------------- database mirror

def _row_values(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    return {
        "file": path.name,
        "sha256": meta["sha256"],
        "size_bytes": meta.get("size_bytes"),
        "parent": meta.get("parent"),
        "metrics": _jsonable(meta.get("metrics") or {}),
        "data_summary": _jsonable(meta.get("data") or {}),
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _ensure_row(session: Any, version: str, models_dir: Path, status: str | None = None
                ) -> ModelVersion:
    from .db import ModelVersion, VersionStatus

    row: ModelVersion | None = session.get(ModelVersion, version)
    if row is None:
        path = version_path(version, models_dir)
        meta = version_metadata(version, models_dir)
        row = ModelVersion(version=version, status=status or VersionStatus.candidate,
                           **_row_values(meta, path))
        created = _parse_time(meta.get("created_at"))
        if created is not None:
            row.created_at = created
        session.add(row)
        session.flush()
    return row


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _mirror_activation(session: Any, version: str, models_dir: Path, when: datetime) -> None:
    import sqlalchemy as sa

    from .db import ModelVersion, VersionStatus

    _ensure_row(session, version, models_dir)
    # Retire first, in its own statement: the one-active unique index is checked per statement.
    session.execute(
        sa.update(ModelVersion)
        .where(ModelVersion.status == VersionStatus.active, ModelVersion.version != version)
        .values(status=VersionStatus.retired)
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        sa.update(ModelVersion).where(ModelVersion.version == version)
        .values(status=VersionStatus.active, activated_at=when, message=None)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()


# --------------------------------------------------------------------------- operations

def publish(
    tmp_file: Path,
    version: str | None = None,
    *,
    models_dir: Path | None = None,
    move: bool = False,
    session: Any = None,
    job_id: str | None = None,
) -> Path:
    """Copy a finished checkpoint into the registry as ``<version>.pt`` (not served yet).

    The checkpoint is validated first (loads with ``weights_only``, has the required keys,
    its ``version`` matches). The copy is fsynced under a temporary name and then hard-linked
    into place, which fails instead of overwriting if the version exists: versions are
    immutable. Publishing the same bytes again is a no-op, so a retried task is harmless.
    With ``session``, a ``candidate`` row is added (flushed, not committed)."""
    root = _dir(models_dir)
    tmp_file = Path(tmp_file)
    meta = read_metadata(tmp_file)
    version = check_version_name(version or str(meta["version"]))
    if str(meta["version"]) != version:
        raise RegistryError(
            f"The checkpoint says it is version {meta['version']!r}, not {version!r}."
        )
    root.mkdir(parents=True, exist_ok=True)
    dest = version_path(version, root)
    if dest.exists():
        return _same_or_fail(dest, meta["sha256"], version, tmp_file, move, session, root, job_id)
    staging = tmp_name(dest)
    try:
        with open(tmp_file, "rb") as src, open(staging, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(staging, dest)  # atomic and never clobbers
        except FileExistsError:
            return _same_or_fail(dest, meta["sha256"], version, tmp_file, move, session, root,
                                 job_id)
        except OSError:  # a filesystem without hard links: check, then rename
            if dest.exists():
                return _same_or_fail(dest, meta["sha256"], version, tmp_file, move, session,
                                     root, job_id)
            os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)
    fsync_dir(root)
    if file_sha256(dest) != meta["sha256"]:  # the copy itself went wrong: do not keep it
        dest.unlink(missing_ok=True)
        raise RegistryError(f"Copying {tmp_file} into the registry corrupted it; try again.")
    if move:
        tmp_file.unlink(missing_ok=True)
    log.info("published model version %s (%s)", version, dest)
    if session is not None:
        row = _ensure_row(session, version, root)
        row.job_id = job_id or row.job_id
        session.flush()
    return dest


def _same_or_fail(dest: Path, sha: str, version: str, src: Path, move: bool, session: Any,
                  root: Path, job_id: str | None) -> Path:
    if file_sha256(dest) != sha:
        raise RegistryError(
            f"Version {version} already exists with different content; versions are "
            "immutable, publish under a new name (registry.new_version_name())."
        )
    if move:
        src.unlink(missing_ok=True)
    if session is not None:
        row = _ensure_row(session, version, root)
        row.job_id = job_id or row.job_id
        session.flush()
    return dest


def activate(version: str, *, models_dir: Path | None = None, session: Any = None,
             force: bool = False) -> Path:
    """Serve ``version``: validate its file, then atomically replace the pointer.

    Refuses a corrupt file and, unless ``force``, a rejected version. With ``session``, the
    database follows (this version ``active``, the previous one ``retired``; flushed, the
    caller commits). The file pointer is written first: it is the truth for serving, and if
    the database part fails the caller can resync with ``sync_db``."""
    root = _dir(models_dir)
    path = version_path(version, root)
    if not path.exists():
        known = ", ".join(_version_files(root)[-5:]) or "none"
        raise RegistryError(f"Unknown model version {version!r} (latest: {known}).")
    meta = version_metadata(version, root)
    rejection = _rejection(root, version)
    if rejection is not None and not force:
        raise RegistryError(
            f"Version {version} was rejected ({rejection.get('reason', 'no reason given')}); "
            "activate it with force=True if you really mean it."
        )
    previous = read_pointer(root)
    now = datetime.now(UTC)
    pointer = {
        "version": version,
        "file": path.name,
        "sha256": meta["sha256"],
        "activated_at": now.isoformat(timespec="seconds"),
        "previous": previous["version"] if previous else None,
    }
    replace_atomically(root / POINTER, json.dumps(pointer, indent=1).encode() + b"\n")
    if rejection is not None:
        (root / f"{version}{REJECTED_SUFFIX}").unlink(missing_ok=True)
    try:
        _append_history(root, pointer)
    except OSError as exc:  # history is an aid, the pointer is what counts
        log.warning("could not append to %s: %s", root / HISTORY, exc)
    log.info("activated model version %s (previous: %s)", version, pointer["previous"])
    if session is not None:
        _mirror_activation(session, version, root, now)
    return path


def reject(version: str, reason: str, *, models_dir: Path | None = None,
           session: Any = None) -> None:
    """Mark a version as refused (by the quality gate or a person). The file is kept for
    audit; the marker keeps it out of the crash fallback and out of ``activate``."""
    from .db import VersionStatus

    root = _dir(models_dir)
    path = version_path(version, root)
    if not path.exists():
        raise RegistryError(f"Unknown model version {version!r}.")
    pointer = read_pointer(root)
    if pointer and pointer["version"] == version:
        raise RegistryError(f"Version {version} is being served; activate another one first.")
    replace_atomically(root / f"{version}{REJECTED_SUFFIX}",
                        json.dumps({"reason": reason, "rejected_at": _utc_iso()}).encode())
    if session is not None:
        row = _ensure_row(session, version, root)
        row.status = VersionStatus.rejected
        row.message = reason
        session.flush()


def lineage(version: str, models_dir: Path | None = None) -> list[str]:
    """``version`` and its ancestors, parent first, as far as their files tell (a missing or
    unreadable ancestor ends the walk)."""
    root = _dir(models_dir)
    chain = [version]
    while len(chain) < 1000:
        try:
            parent = read_metadata(version_path(chain[-1], root)).get("parent")
        except RegistryError:
            break
        if not parent or parent in chain:
            break
        chain.append(str(parent))
    return chain


def served_lineage(models_dir: Path | None = None) -> list[str]:
    """The served version and its ancestors; empty when nothing is served (every upload is
    then new: there is no model that learnt it)."""
    try:
        version, _ = current(models_dir)
    except UserError:
        return []
    return lineage(version, models_dir)


def serve(version: str, *, force: bool = False, models_dir: Path | None = None,
          db_url: str | None = None) -> dict[str, Any]:
    """The one way a person or a program changes the served model (API, pages, CLI alike):
    refuse what must not be served, with a code each adapter can answer with, then
    ``activate`` it with the database following. Database down: the pointer is the truth for
    serving, so the swap still happens and ``sync_db`` reconciles later. Returns the version
    and the one it replaced."""
    from .db import DatabaseUnavailable, session_scope

    root = _dir(models_dir)
    try:
        check_version_name(version)
    except RegistryError as exc:  # no such version can exist: the same answer as any unknown
        raise RegistryError(exc.message, code="unknown_version", status=404) from None
    info = next((v for v in list_versions(root) if v.version == version), None)
    if info is None:
        raise RegistryError(f"No model version {version!r}.", code="unknown_version",
                            status=404)
    if info.status == "corrupt":
        raise RegistryError(info.error or "The file is unreadable.", code="version_corrupt",
                            status=409)
    if info.status == "rejected" and not force:
        raise RegistryError(
            f"Version {version} was rejected ({info.reason or 'no reason given'}); pass "
            "force=true to serve it anyway.", code="version_rejected", status=409)
    pointer = read_pointer(root)
    previous = pointer["version"] if pointer else None
    try:
        with session_scope(db_url) as session:
            activate(version, models_dir=root, session=session, force=force)
    except DatabaseUnavailable as exc:
        log.warning("serving %s without recording it in the database (%s)", version,
                    exc.message)
        now = read_pointer(root)
        if not now or now["version"] != version:
            activate(version, models_dir=root, force=force)
    return {"version": version, "previous": previous}


def rollback(*, models_dir: Path | None = None, session: Any = None) -> str:
    """Serve the model the current one replaced, and return its version.

    That is the current checkpoint's parent (the model it was fine-tuned from), or the
    nearest usable ancestor; for a model without lineage, the version that was being served
    before it was first activated. Repeating walks further back; at the root it refuses."""
    root = _dir(models_dir)
    served, path = current(root)
    candidates: list[str] = []
    meta: dict[str, Any] | None = read_metadata(path)
    for _ in range(100):  # the lineage, parent first
        parent = meta.get("parent") if meta else None
        if not parent or parent in candidates or parent == served:
            break
        candidates.append(str(parent))
        try:
            meta = read_metadata(version_path(str(parent), root))
        except RegistryError:
            meta = None
    history = [e["version"] for e in _history(root)]
    if served in history:
        candidates += reversed(history[: history.index(served)])
    else:
        pointer = read_pointer(root)
        if pointer and pointer.get("previous"):
            candidates.append(str(pointer["previous"]))
    for version in dict.fromkeys(candidates):
        with contextlib.suppress(RegistryError):
            if (version != served and _rejection(root, version) is None
                    and _valid(root, version)):
                activate(version, models_dir=root, session=session)
                return version
    raise RegistryError(
        f"Nothing to roll back to: {served} has no usable parent and nothing was served "
        "before it."
    )


def list_versions(models_dir: Path | None = None, session: Any = None) -> list[VersionInfo]:
    """Every version, newest first, with its status; database facts merged in if a session is
    given (and versions the database knows whose file is gone, as ``missing``)."""
    root = _dir(models_dir)
    pointer = read_pointer(root)
    active = pointer["version"] if pointer else None
    activated = {e["version"]: e.get("activated_at") for e in _history(root)}
    infos: dict[str, VersionInfo] = {}
    for version in _version_files(root):
        path = version_path(version, root)
        info = VersionInfo(version=version, file=path.name, status="candidate",
                           active=version == active, activated_at=activated.get(version))
        try:
            meta = version_metadata(version, root)
            info.parent = meta.get("parent")
            info.created_at = str(meta.get("created_at")) if meta.get("created_at") else None
            info.sha256, info.size_bytes = meta["sha256"], meta["size_bytes"]
            info.metrics = _jsonable(meta.get("metrics") or {})
            info.data = _jsonable(meta.get("data") or {})
            info.classes = list(meta.get("classes") or [])
        except RegistryError as exc:
            info.status, info.error = "corrupt", exc.message
        rejection = _rejection(root, version)
        if info.error is None:
            if info.active:
                info.status = "active"
            elif rejection is not None:
                info.status, info.reason = "rejected", rejection.get("reason")
            elif version in activated:
                info.status = "retired"
        infos[version] = info
    if session is not None:
        import sqlalchemy as sa

        from .db import ModelVersion

        for row in session.scalars(sa.select(ModelVersion)):
            known = infos.get(row.version)
            if known is None:
                infos[row.version] = VersionInfo(
                    version=row.version, file=row.file, status="missing", parent=row.parent,
                    sha256=row.sha256, metrics=row.metrics or {}, data=row.data_summary or {},
                    created_at=row.created_at.isoformat() if row.created_at else None,
                    error="The database lists this version but its file is gone.")
                continue
            if row.activated_at is not None:
                known.activated_at = row.activated_at.isoformat(timespec="seconds")
            known.reason = known.reason or row.message
    return sorted(infos.values(), key=lambda i: i.version, reverse=True)


def sync_db(session: Any, models_dir: Path | None = None) -> None:
    """Make ``model_versions`` agree with the files: add rows for unknown versions, set each
    status from the files (the pointer decides which one is active). Flushes only."""
    root = _dir(models_dir)
    served = None
    for info in list_versions(root):
        if info.status in ("corrupt", "missing"):
            continue
        if info.active:
            served = info
            _ensure_row(session, info.version, root)
            continue
        row = _ensure_row(session, info.version, root, info.status)
        row.status = info.status
        row.message = info.reason or row.message
        session.flush()
    if served is not None:
        when = _parse_time(served.activated_at) or datetime.now(UTC)
        row = _ensure_row(session, served.version, root)
        if row.status != "active":
            _mirror_activation(session, served.version, root, row.activated_at or when)
