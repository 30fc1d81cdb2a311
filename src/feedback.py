"""Predictions that become training data: "Wrong? It was …".

A person who sees a wrong answer knows the right one, and that correction is the most useful
clip the next retrain can get. So every prediction made for a person (and for a program that
asks, ``?keep=true``) keeps its clip for a while under an unguessable id; a correction sends
the id and the true label, and the kept clip goes through the ordinary upload path — the same
checks, the leakage guard, the duplicate check — as a one-file labelled upload.

Kept clips live under ``state_dir/predictions`` for ``KEEP_S`` seconds (one hour), at most
``MAX_KEPT`` of them: enough to correct what one has just seen, without becoming a second,
unchecked archive of everything anyone ever classified.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

from .errors import UserError
from .files import tmp_name
from .ingest import IngestReport, ingest
from .settings import Settings

KEEP_S = 3600.0
MAX_KEPT = 2000
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SWEEP_EVERY_S = 60.0
_last_sweep = 0.0


class FeedbackError(UserError):
    """An unknown or expired prediction id (404), or a label we do not know (400)."""

    code, status = "not_found", 404


def _dir(settings: Settings) -> Path:
    return settings.state_dir / "predictions"


def keep(data: bytes, name: str | None, settings: Settings) -> str:
    """Keep a predicted clip; returns its id. The original name (sanitised by the caller) is
    kept beside it, so a file named like an UrbanSound8K slice stays recognisable to the
    leakage guard."""
    folder = _dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    _sweep(folder)
    pid = secrets.token_urlsafe(18)
    safe = (name or "clip.wav").replace("/", "_").replace("\\", "_")[:200] or "clip.wav"
    (folder / f"{pid}.name").write_text(safe)
    tmp = tmp_name(folder / f"{pid}.bin")  # a reader never sees half a clip; no fsync: a
    tmp.write_bytes(data)                  # kept clip is a convenience, not a record
    os.replace(tmp, folder / f"{pid}.bin")
    return pid


def _sweep(folder: Path, now: float | None = None) -> None:
    """Drop expired clips, and the oldest beyond ``MAX_KEPT``; at most once a minute."""
    global _last_sweep
    now = time.time() if now is None else now
    if now - _last_sweep < _SWEEP_EVERY_S:
        return
    _last_sweep = now
    try:
        kept = sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for i, path in enumerate(kept):
        try:
            if now - path.stat().st_mtime > KEEP_S or len(kept) - i > MAX_KEPT:
                path.unlink(missing_ok=True)
                path.with_suffix(".name").unlink(missing_ok=True)
        except OSError:
            continue


def kept(pid: str, settings: Settings) -> tuple[bytes, str]:
    """The kept clip and its name; ``FeedbackError`` if unknown or older than ``KEEP_S``."""
    if not _ID.match(pid or ""):
        raise FeedbackError(f"No kept prediction {pid!r}.")
    path = _dir(settings) / f"{pid}.bin"
    try:
        age = time.time() - path.stat().st_mtime
        if age > KEEP_S:
            raise FileNotFoundError
        name = path.with_suffix(".name").read_text(errors="replace").strip() or "clip.wav"
        return path.read_bytes(), name
    except FileNotFoundError:
        raise FeedbackError(
            f"Prediction {pid} is unknown or older than {KEEP_S / 3600:g} h; classify the "
            "clip again, or upload it with its label.") from None


def record(pid: str, label: str, *, source: str, client: str, settings: Settings
           ) -> IngestReport:
    """Store the kept clip as a labelled upload through every upload check; the kept copy is
    removed once it is accepted (a second correction then says it is already stored)."""
    data, name = kept(pid, settings)
    from .preprocessing import CLASSES, normalise_label

    true_label = normalise_label(str(label or ""))
    if true_label is None:
        raise FeedbackError(f"Unknown label {label!r}; expected one of: {', '.join(CLASSES)}.",
                            code="unknown_label", status=400)
    report = ingest([(name, data)], label=true_label, source=source,
                    client=f"feedback {client}"[:200], settings=settings)
    if report.n_accepted:
        for suffix in (".bin", ".name"):
            (_dir(settings) / f"{pid}{suffix}").unlink(missing_ok=True)
    return report


__all__ = ["KEEP_S", "FeedbackError", "keep", "kept", "record"]

