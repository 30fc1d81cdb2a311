"""Getting UrbanSound8K onto disk: fetch the official archive, unpack it, import a copy.

The archive is 6 GB, so the download resumes where it stopped (a ``.part`` file and an HTTP
``Range`` request) and proves itself with a checksum before it is renamed into place: a
half-written or corrupt archive never looks finished. Unpacking refuses anything that could
write outside its folder. Importing turns the official layout (``audio/foldN`` + metadata)
into the project's class-per-folder layout, keeping fold and recording (fsID) in a manifest
so fold-aware, leak-free splits stay possible.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from .datasets import Clip, is_us8k, read_manifest, read_us8k, write_manifest
from .errors import UserError
from .preprocessing import CLASSES

US8K_URL = "https://zenodo.org/records/1203745/files/UrbanSound8K.tar.gz"
US8K_MD5 = "9aa69802bbf37fb986f71ec1483a196e"  # as published by the Zenodo record
US8K_SOURCE = "us8k"
SPLITS = ("train", "test")


class DataError(UserError):
    """A data-acquisition failure the user can act on; ``message`` is the one line to print."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NetworkError(DataError):
    """The server could not be reached or the connection broke."""


class DownloadError(DataError):
    """The server answered, but not with the file (404, 500 ...)."""


class ChecksumError(DataError):
    """The bytes arrived but are not the published file; they have been deleted."""


class ArchiveError(DataError):
    """The archive is unreadable or holds members that could escape the target folder."""


class ImportDataError(DataError):
    """The folder to import is not an UrbanSound8K copy, or the target holds other data."""


# --------------------------------------------------------------------------- download

def archive_name(url: str) -> str:
    return Path(unquote(urlparse(url).path)).name or "download"


def _digests(path: Path, sha256: str | None, md5: str | None) -> dict[str, tuple[str, str]]:
    """``{algorithm: (expected, actual)}`` for the checksums that were asked for."""
    wanted = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    hashes = {name: hashlib.new(name) for name in wanted}
    if hashes:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                for h in hashes.values():
                    h.update(block)
    return {name: (wanted[name], hashes[name].hexdigest()) for name in wanted}


def _mismatch(path: Path, sha256: str | None, md5: str | None) -> str | None:
    for name, (expected, actual) in _digests(path, sha256, md5).items():
        if expected != actual:
            return f"{name} mismatch for {path.name}: expected {expected}, got {actual}"
    return None


def _verify(path: Path, sha256: str | None, md5: str | None) -> None:
    """A mismatch deletes the file: resuming onto bad bytes would never succeed."""
    problem = _mismatch(path, sha256, md5)
    if problem:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{problem}; the file was deleted, run the command again to "
                            "download it afresh.")


def _total_from_content_range(value: str | None) -> int | None:
    """``bytes 100-199/2000`` or ``bytes */2000`` → 2000 (None when unknown)."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _start_of_content_range(value: str | None) -> int | None:
    if not value or not value.startswith("bytes ") or "-" not in value:
        return None
    start = value[6:].split("-", 1)[0].strip()
    return int(start) if start.isdigit() else None


def _request(session: requests.Session, url: str, offset: int, timeout: float
             ) -> requests.Response:
    # identity: byte offsets and Content-Length must count the file's bytes, not gzip's
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.exceptions.Timeout:
        raise NetworkError(f"{urlparse(url).netloc}: no answer within {timeout:g} s.") from None
    except requests.exceptions.ConnectionError as exc:
        raise NetworkError(f"cannot reach {urlparse(url).netloc}: {_reason(exc)}.") from None
    except requests.exceptions.RequestException as exc:
        raise NetworkError(f"download of {url} failed: {exc}") from None


def _reason(exc: Exception) -> str:
    """urllib3 nests the OS error three levels deep; users need only its last words."""
    text = str(exc)
    if "Failed to resolve" in text or "NameResolution" in text:
        return "host name could not be resolved (no network?)"
    if "refused" in text.lower():
        return "connection refused"
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return found[-1].strip() if found else "connection failed"


def _blocks(response: requests.Response, chunk: int) -> Iterator[bytes]:
    """Whatever has arrived, up to ``chunk`` bytes at a time. ``iter_content`` waits for a full
    chunk and throws away what it holds when the connection breaks; ``read1`` hands every byte
    over first, so a resume loses nothing."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # pragma: no cover - urllib3 < 2
        yield from response.iter_content(chunk_size=chunk)
        return
    while block := read1(chunk, decode_content=True):
        yield block


def _stream(response: requests.Response, part: Path, mode: str, offset: int, chunk: int,
            progress: bool) -> None:
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=part.name[:-5], disable=not progress,
                                     leave=False) as bar:
        for block in _blocks(response, chunk):
            f.write(block)
            bar.update(len(block))
        f.flush()
        os.fsync(f.fileno())
    if total is not None and part.stat().st_size != total:
        raise requests.exceptions.ChunkedEncodingError(
            f"got {part.stat().st_size} of {total} bytes")


def _fetch_once(session: requests.Session, url: str, part: Path, chunk: int, progress: bool,
                timeout: float) -> bool:
    """One request. Returns True when ``part`` holds the whole file, False to go again."""
    offset = part.stat().st_size if part.exists() else 0
    with _request(session, url, offset, timeout) as r:
        if r.status_code == 416 and offset:
            total = _total_from_content_range(r.headers.get("Content-Range"))
            if total is None or total == offset:
                return True  # nothing left to send: the .part is already complete
            part.unlink()  # the .part is longer than the file: it is not this file
            return False
        if r.status_code == 206 and _start_of_content_range(
                r.headers.get("Content-Range")) == offset:
            _stream(r, part, "ab", offset, chunk, progress)
            return True
        if r.status_code == 200:  # the server ignored Range (or none was sent): start over
            _stream(r, part, "wb", 0, chunk, progress)
            return True
        if r.status_code == 206:  # a range we did not ask for: do not splice it in
            part.unlink(missing_ok=True)
            return False
        raise DownloadError(f"HTTP {r.status_code} {r.reason or ''}".strip() + f" for {url}.")


def download(url: str, dest: Path, sha256: str | None = None, md5: str | None = None,
             chunk: int = 1 << 20, progress: bool = True, timeout: float = 30,
             retries: int = 3) -> Path:
    """Fetch ``url`` to ``dest`` (a file, or a folder to put it in), resuming a ``.part``.

    A broken connection is retried ``retries`` times, each resuming where the last stopped;
    running the command again later resumes too. ``dest`` appears only once the checksum
    (when given) matches. An existing ``dest`` that passes the checksum is kept as it is.
    """
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / archive_name(url)
    if dest.is_file():
        if not _mismatch(dest, sha256, md5):
            return dest
        dest.unlink()  # an older or damaged copy: replace it
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with requests.Session() as session:
        # One try more than ``retries``: a stale .part that had to be dropped gets a fresh go.
        for attempt in range(retries + 2):
            try:
                if _fetch_once(session, url, part, chunk, progress, timeout):
                    break
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
                    requests.exceptions.Timeout, urllib3.exceptions.HTTPError) as exc:
                if attempt >= retries:
                    raise NetworkError(
                        f"the connection to {urlparse(url).netloc} kept breaking ({exc}); "
                        f"{part.name} is kept: run the command again to resume."
                    ) from None
        else:
            raise DownloadError(f"{url}: the server's answers never made up the whole file.")
    _verify(part, sha256, md5)
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------- extraction

def _check_member(member: tarfile.TarInfo) -> None:
    """Stricter than ``filter="data"`` alone: an archive of audio has no business holding
    links or devices at all, so their mere presence means it is not the archive we want."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"refusing archive member with an absolute path: {name}")
    if ".." in name.replace("\\", "/").split("/"):
        raise ArchiveError(f"refusing archive member that leaves the target folder: {name}")
    if member.issym() or member.islnk():
        raise ArchiveError(f"refusing archive member that is a link: {name}")
    if member.isdev() or not (member.isfile() or member.isdir()):
        raise ArchiveError(f"refusing archive member that is a device or special file: {name}")


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a tar(.gz) into ``dest`` and return the data set's root inside it.

    Every member is checked before anything is written, so a hostile archive writes nothing.
    Unpacking goes to a staging folder that is renamed into place: an interrupted run leaves
    no half-unpacked tree that looks complete.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such file.")
    stamp = dest / f".{archive.name}.extracted"
    fingerprint = f"{archive.stat().st_size} {archive.stat().st_mtime_ns}"
    done = _read_stamp(stamp, fingerprint)
    if done is not None and all((dest / name).exists() for name in done):
        return _data_root(dest, done)  # unpacking 6 GB again would change nothing
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            dest.mkdir(parents=True, exist_ok=True)
            stamp.unlink(missing_ok=True)  # from here on, an interruption means "not done"
            staging = dest / f".extracting-{archive.name}"
            shutil.rmtree(staging, ignore_errors=True)
            tar.extractall(staging, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive.name}: cannot unpack ({exc}).") from None
    tops = sorted(p.name for p in staging.iterdir())
    for name in tops:
        target = dest / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(staging / name, target)
    staging.rmdir()
    stamp.write_text("\n".join([fingerprint, *tops]) + "\n", encoding="utf-8")
    return _data_root(dest, tops)


def _read_stamp(stamp: Path, fingerprint: str) -> list[str] | None:
    """The top-level names a previous unpacking of this very archive produced, if any."""
    try:
        first, *tops = stamp.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return None
    return tops if first == fingerprint and tops else None


def _data_root(dest: Path, tops: list[str]) -> Path:
    """The folder holding ``metadata/UrbanSound8K.csv`` (the archive wraps it in
    ``UrbanSound8K/``); otherwise the single top folder, otherwise ``dest``."""
    for name in tops:
        if is_us8k(dest / name):
            return dest / name
    if len(tops) == 1 and (dest / tops[0]).is_dir():
        return dest / tops[0]
    return dest


# --------------------------------------------------------------------------- import

def _locate_us8k(src_dir: Path) -> Path:
    """Accept the data set's root or the folder the archive was unpacked into."""
    if not src_dir.is_dir():
        raise ImportDataError(f"{src_dir}: no such folder.")
    for candidate in (src_dir, src_dir / "UrbanSound8K"):
        if is_us8k(candidate):
            return candidate
    raise ImportDataError(
        f"{src_dir}: not an UrbanSound8K copy (metadata/UrbanSound8K.csv is missing)."
    )


def foreign_files(data_dir: Path, source: str) -> list[Path]:
    """Audio under ``data_dir/{train,test}`` that the manifests do not attribute to ``source``.

    One data folder holds one data set: synthetic clips mixed into UrbanSound8K (or the other
    way round) would make every reported number a lie about both.
    """
    found = []
    for split in SPLITS:
        root = data_dir / split
        if not root.is_dir():
            continue
        manifest = read_manifest(root)
        for path in root.rglob("*"):
            if path.is_file() and path.name != "manifest.csv" and not path.name.startswith("."):
                row = manifest.get(path.relative_to(root).as_posix())
                if row is None or row.get("source") != source:
                    found.append(path)
    return sorted(found)


def check_import_target(data_dir: Path) -> None:
    """Fail before a long download, not after it, when the target holds other data."""
    foreign = foreign_files(Path(data_dir), US8K_SOURCE)
    if foreign:
        raise ImportDataError(
            f"{data_dir} already holds {len(foreign)} file(s) that are not UrbanSound8K "
            f"(e.g. {foreign[0].relative_to(data_dir)}); remove them or import into another "
            "folder."
        )


def _place(src: Path, target: Path, link: bool) -> str:
    """Hardlink when possible (no extra disk for 6 GB), else copy; via a temporary name and
    ``os.replace`` so an interrupted import never leaves a truncated clip."""
    if target.is_file() and (target.samefile(src)
                             or target.stat().st_size == src.stat().st_size):
        return "skipped"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    how = "copied"
    if link:
        try:
            os.link(src, tmp)
            how = "linked"
        except OSError:
            pass
    if how == "copied":
        shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    return how


def _merge_manifest(root: Path, new: list[Clip], gone: set[Path]) -> None:
    """Keep earlier imports (a second, larger copy adds to the first), drop rows whose file
    moved to the other split or vanished, and let the new rows win."""
    clips = {}
    for rel, row in read_manifest(root).items():
        path = root / rel
        if path.is_file() and path not in gone and row.get("label") in CLASSES:
            fold = int(row["fold"]) if row.get("fold") else None
            clips[path] = Clip(path, row["label"], fold, row.get("group", ""),
                               row.get("source") or US8K_SOURCE)
    clips.update({c.path: c for c in new})
    write_manifest(root, sorted(clips.values(), key=lambda c: c.path.relative_to(root).parts))


def import_us8k(src_dir: Path, data_dir: Path, test_folds: Iterable[int] = frozenset({10}),
                progress: bool = True, link: bool = True, folds: Iterable[int] | None = None
                ) -> dict[str, Any]:
    """Copy an UrbanSound8K tree into ``data_dir/{train,test}/<class>/``, folds preserved.

    Clips of ``test_folds`` go to ``test/``, the rest to ``train/``; ``folds`` limits the
    import to some folds (all by default). Idempotent: a clip already
    in place is skipped, and one that changes split (other ``test_folds``) moves rather than
    being duplicated, so a recording can never sit in both splits.
    """
    root = _locate_us8k(Path(src_dir))
    data_dir = Path(data_dir)
    test_folds = {int(f) for f in test_folds}
    clips = read_us8k(root, {int(f) for f in folds} if folds else None)
    if not clips:
        raise ImportDataError(f"{root}: the metadata names no audio file that exists here"
                              + (f" in folds {sorted(folds)}." if folds else "."))
    check_import_target(data_dir)
    placed: dict[str, list[Clip]] = {split: [] for split in SPLITS}
    moved: set[Path] = set()
    actions: Counter[str] = Counter()
    for clip in tqdm(clips, desc="importing clips", unit="clip", disable=not progress,
                     leave=False):
        split = "test" if clip.fold in test_folds else "train"
        other_split = "train" if split == "test" else "test"
        other = data_dir / other_split / clip.label / clip.path.name
        if other.is_file():
            other.unlink()
            moved.add(other)
        target = data_dir / split / clip.label / clip.path.name
        actions[_place(clip.path, target, link)] += 1
        placed[split].append(Clip(target, clip.label, clip.fold, clip.group, US8K_SOURCE))
    for split in SPLITS:
        (data_dir / split).mkdir(parents=True, exist_ok=True)
        _merge_manifest(data_dir / split, placed[split], moved)
    # A note left by an earlier, since removed synthetic set would now mislabel real data.
    (data_dir / "SYNTHETIC.md").unlink(missing_ok=True)
    return {
        "source": str(root), "data_dir": str(data_dir), "test_folds": sorted(test_folds),
        "train": len(placed["train"]), "test": len(placed["test"]),
        "folds": sorted({c.fold for c in clips if c.fold is not None}),
        "per_class": dict(sorted(Counter(c.label for c in clips).items())),
        "linked": actions["linked"], "copied": actions["copied"],
        "skipped": actions["skipped"], "moved": len(moved),
    }
