"""Zip archives in uploads, read defensively: members out, and nothing else.

Archives are hostile until proven otherwise: names are checked (``..``, absolute paths, drive
letters; backslashes are read as separators), symlinks and nested archives are refused, the
member count is checked before the central directory is parsed, and decompressed bytes are
counted as they are produced, so a zip bomb costs at most ``max_clip_mb`` per member and
``max_archive_bytes_mb`` per archive whatever its headers claim.

A problem with one member refuses that member (``Reject``: ``unsafe_path``,
``nested_archive``, ``not_audio``, ``undecodable`` when encrypted, ``too_large``,
``bad_archive`` when corrupt); a problem with the archive as a whole stops reading it
(``ArchiveAbort``: ``not_found``, ``too_large``, ``bad_archive``, ``too_many_files``,
``archive_too_large``) and the caller discards everything taken from it. Only ``.zip`` is
expanded; ``ARCHIVE_EXTENSIONS`` lists what is recognised (and refused) as an archive.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import datasets
from .settings import Settings
from .upload_checks import (
    CHUNK,
    MIB,
    Content,
    Reject,
    display,
    skippable,
    split_name,
    too_large_msg,
)

ARCHIVE_EXTENSIONS = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".zst",
                      ".7z", ".rar", ".lz", ".lzma", ".z", ".cab", ".jar", ".war", ".iso"}
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07",
                 b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
# Central directory entries are >= 46 bytes plus the name; 4 KiB per member is generous.
_CD_BYTES_PER_MEMBER = 4096


class ArchiveAbort(Exception):
    """Stops reading an archive altogether; everything taken from it is discarded."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Member:
    """One file of an archive, judged on its name and size: ``data`` to check further, or
    ``refused``, or ``skipped`` (operating-system litter, neither accepted nor rejected)."""

    name: str  # "<archive>/<member>", for reports
    parts: list[str] = field(default_factory=list)
    data: bytes = b""
    refused: Reject | None = None
    skipped: bool = False


def is_archive_magic(head: bytes) -> bool:
    return any(head.startswith(m) for m in ARCHIVE_MAGIC) or head[257:262] == b"ustar"


def is_zip(content: Content) -> bool:
    """Whether ``content`` starts like a zip (for names without an extension)."""
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


@contextlib.contextmanager
def open_archive(content: Content, spool_dir: Path, cap: int) -> Iterator[IO[bytes]]:
    """A seekable handle on ``content``; a non-seekable stream is spooled into ``spool_dir``,
    at most ``cap`` bytes of it."""
    if isinstance(content, bytes | bytearray):
        yield io.BytesIO(content)
    elif isinstance(content, Path):
        try:
            f = open(content, "rb")  # noqa: SIM115 - closed below, after the yield
        except OSError as exc:
            raise ArchiveAbort("not_found", f"Cannot open {content}: {exc}") from None
        with f:
            yield f
    elif content.seekable():
        yield content
    else:  # zip needs random access: spool a non-seekable stream, bounded
        spooled = spool_dir / f"archive-{uuid.uuid4().hex}.zip"
        with open(spooled, "w+b") as spool:
            n = 0
            while block := content.read(CHUNK):
                n += len(block)
                if n > cap:
                    raise ArchiveAbort("too_large", f"The archive is larger than the "
                                       f"{cap // MIB} MiB upload limit.")
                spool.write(block)
            spool.seek(0)
            yield spool


def zip_members(archive: str, fh: IO[bytes], settings: Settings) -> Iterator[Member]:
    """Each file member of the zip in ``fh``, read one at a time (folders are left out);
    raises ``ArchiveAbort`` when the archive as a whole is refused."""
    s = settings
    too_many = ArchiveAbort("too_many_files", f"The archive holds more than "
                            f"{s.max_archive_members} files; split it.")
    try:
        declared = declared_entries(fh)
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
        raise ArchiveAbort("bad_archive", f"Not a readable zip archive ({exc}).") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > s.max_archive_members:
            raise too_many
        budget = s.max_archive_bytes_mb * MIB
        for info in infos:
            if info.is_dir():
                continue
            member, used = _member(archive, zf, info, budget, s)
            budget -= used  # decompressed bytes are charged to the archive
            yield member


def _member(archive: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int,
            settings: Settings) -> tuple[Member, int]:
    """Judge one member; returns it and the bytes it decompressed."""
    member = Member(display(f"{archive}/{info.filename}"))
    try:
        member.parts = split_name(info.filename)
        if skippable(member.parts):
            member.skipped = True
            return member, 0
        if is_symlink(info):
            raise Reject("unsafe_path", "Symbolic links are not allowed in archives.")
        ext = Path(member.parts[-1]).suffix.lower()
        if ext in ARCHIVE_EXTENSIONS:
            raise Reject("nested_archive", "Archives inside archives are not expanded.")
        if ext and ext not in datasets.AUDIO_EXTENSIONS:
            raise Reject("not_audio", f"'{ext}' is not an audio file type.")
        if info.flag_bits & 0x1:
            raise Reject("undecodable", "The member is encrypted.")
    except Reject as rej:
        member.refused = rej
        return member, 0
    data, used = _read_member(zf, info, budget, settings)
    if isinstance(data, Reject):
        member.refused = data
    elif is_archive_magic(data[:512]):
        member.refused = Reject("nested_archive", "Archives inside archives are not expanded.")
    else:
        member.data = data
    return member, used


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int,
                 settings: Settings) -> tuple[bytes | Reject, int]:
    """Decompress in chunks, counting what is actually produced: header sizes lie."""
    clip_cap = settings.max_clip_mb * MIB
    buf = bytearray()
    try:
        with zf.open(info) as member:
            while block := member.read(CHUNK):
                buf += block
                if len(buf) > budget:
                    raise ArchiveAbort(
                        "archive_too_large", "The archive decompresses to more than "
                        f"{settings.max_archive_bytes_mb} MiB; split it.")
                if len(buf) > clip_cap:
                    return Reject("too_large", too_large_msg(clip_cap)), len(buf)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
            RuntimeError, ValueError) as exc:
        return Reject("bad_archive", f"The member is corrupt ({exc})."), len(buf)
    return bytes(buf), len(buf)


def declared_entries(fh: IO[bytes]) -> tuple[int, int] | None:
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


def is_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000
