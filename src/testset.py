"""A model's test set, named so that the next retrain is graded on exactly the same clips.

Every checkpoint carries a **test-set spec** in ``data["test_set"]``: its kind (``folds`` of
the data set, a ``folder`` of test clips, or a recording-grouped ``split``), the folds, a
description, and the content hashes and recording ids of the clips. Retrains copy it into the
candidate unchanged (completing the hashes when the clips are at hand), so provenance survives
any number of promotions and rollbacks, and the upload path can refuse a file that belongs to
it (``retrain_data.guard``). Pure functions of files and dicts: training imports this too.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from . import files
from .datasets import Clip


def spec_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's test-set spec; older checkpoints only named ``metrics.test_folds``."""
    data = ckpt.get("data") or {}
    spec = dict(data.get("test_set") or {})
    if not spec:
        metrics = ckpt.get("metrics") or {}
        folds = metrics.get("test_folds") or []
        how = metrics.get("split") or data.get("split") or ""
        spec = {"kind": "folds" if folds else "split", "folds": list(folds),
                "description": how.removeprefix("test = "),
                "n": (data.get("test") or {}).get("n")}
    spec.setdefault("sha256", [])
    spec.setdefault("recordings", [])
    return spec


def spec_for(clips: list[Clip], kind: str, description: str, folds: list[int] | None = None
             ) -> dict[str, Any]:
    """A spec naming exactly these clips: what ``train`` and ``retrain`` store."""
    return {"kind": kind, "folds": sorted(folds or []), "description": description,
            "n": len(clips), "sha256": sorted({file_sha256(c.path) for c in clips}),
            "recordings": sorted({c.group for c in clips})}


def with_scores(spec: dict[str, Any], version: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The spec plus the scores ``version`` earned on exactly this test set. A retrain graded
    elsewhere (held-out uploads) carries them on unchanged, so whoever quotes "the served
    line's figures on fold 3" quotes figures really measured on fold 3, and by whom."""
    keep = ("n", "accuracy", "macro_f1", "loss")
    return {**spec, "scores": {"version": version, **{k: metrics[k] for k in keep
                                                      if k in metrics}}}


def recorded_scores(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The figures measured on the checkpoint's own test set, by it or an ancestor; older
    checkpoints have them in ``metrics`` when they were graded on their test folds."""
    spec = spec_of(ckpt)
    if spec.get("scores"):
        return dict(spec["scores"])
    metrics = ckpt.get("metrics") or {}
    if metrics.get("test_folds") and metrics.get("macro_f1") is not None:
        return {"version": ckpt.get("version"), "n": metrics.get("n"),
                "accuracy": metrics.get("accuracy"), "macro_f1": metrics["macro_f1"]}
    return None


_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """Cached by (path, size, mtime): test sets are hashed again on every upload otherwise."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = files.file_sha256(path)
    with _hash_lock:
        _hash_cache[key] = digest
    return digest


