"""Durable file operations shared by the registry, ingestion and the feature cache.

A model version, an accepted upload and a cached waveform all follow one rule: write to a
temporary name, fsync, ``os.replace`` onto the final name, fsync the folder. A reader then sees
the old file or the new one, never half of one, and a crash at any point loses nothing that
was reported as saved.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a power cut (the entry is in the dir)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(target: Path) -> Path:
    return target.with_name(
        f".{target.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp"
    )


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(target: Path, data: bytes) -> None:
    tmp = tmp_name(target)
    try:
        write_durably(tmp, data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
