"""A model's test set, named so that the next retrain is graded on exactly the same clips.

Every checkpoint carries a **test-set spec** in ``data["test_set"]``: its kind (``folds`` of
the data set, a ``folder`` of test clips, or a recording-grouped ``split``), the folds, a
description, and the content hashes and recording ids of the clips. Retrains copy it into the
candidate unchanged (completing the hashes when the clips are at hand), so provenance survives
any number of promotions and rollbacks.

The same spec, resolved against the installed data set (``fixed_test``: the model's test
folds, else ``data/test``), is what retraining grades on (``retrain_data``) and what the
upload path refuses to learn from: ``guard`` is the leakage check, so a file whose content, or
whose UrbanSound8K recording, belongs to the gate's test set is refused (``in_test_set``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .datasets import Clip, DatasetError, group_of, named_test_split
from .errors import UserError
from .settings import Settings, get_settings


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


# --------------------------------------------------------------------------- the data set

class RetrainError(UserError):
    """A retrain that cannot go on for a reason a person can fix; becomes the job's error."""


@dataclass
class TestSet:
    kind: str  # folds | folder | uploads
    clips: list[Clip]
    description: str
    folds: list[int] = field(default_factory=list)


def fixed_test(spec: dict[str, Any], data_dir: Path
               ) -> tuple[TestSet, list[Clip], str] | None:
    """(test set, base training clips, their description) from the data set — the served
    model's test folds, else ``data/test`` (``datasets.named_test_split``) — or None."""
    root = data_dir
    folds = set(spec.get("folds") or [])
    try:
        named = named_test_split(root, folds) if root.is_dir() else None
    except DatasetError as exc:
        if folds and not (root / "test").is_dir():  # a folder that is no data set at all
            return None
        raise RetrainError(exc.message) from None
    if named is None:
        return None
    kind, train, test, how = named
    if kind == "folds":
        others = sorted({c.fold for c in train if c.fold is not None})
        return (TestSet("folds", test, how, sorted(folds)), train,
                f"{root}" + (f" fold(s) {others}" if others else ""))
    return TestSet("folder", test, how), train, str(root / "train")


# --------------------------------------------------------------------------- leakage guard

@dataclass(frozen=True)
class Guard:
    hashes: frozenset[str]
    recordings: frozenset[str]
    description: str

    def check(self, sha256: str, name: str) -> str | None:
        """Why this file belongs to the test set, or None."""
        if sha256 in self.hashes:
            return f"Same content as a clip of the quality gate's test set ({self.description})."
        stem = Path(name.replace("\\", "/").rsplit("/", 1)[-1]).stem
        group = group_of(Path(stem))
        if group != stem and group in self.recordings:
            return (f"Recording {group} belongs to the quality gate's test set "
                    f"({self.description}); training on it would make the gate meaningless. "
                    "Upload clips of other recordings.")
        return None


_guards: dict[tuple[Any, ...], Guard] = {}
_guard_lock = threading.Lock()


def guard(settings: Settings | None = None) -> Guard:
    """The served model's test set as hashes and recordings, from its spec and — when the
    data set is installed — from the test clips themselves (older checkpoints name only the
    folds). Cached per served version and data folder state."""
    from . import registry

    settings = settings or get_settings()
    try:
        version, path = registry.current(settings.models_dir)
        spec = spec_of(registry.read_metadata(path))
    except UserError:
        return Guard(frozenset(), frozenset(), "")
    root = settings.data_dir
    try:
        stamp = tuple(p.stat().st_mtime_ns for p in (root, root / "test", root / "metadata")
                      if p.exists())
    except OSError:
        stamp = ()
    key = (version, str(root), stamp)
    with _guard_lock:
        if key in _guards:
            return _guards[key]
    hashes, recordings = set(spec["sha256"]), set(spec["recordings"])
    description = spec.get("description") or "the served model's test set"
    try:
        fixed = fixed_test(spec, settings.data_dir)
    except RetrainError:
        fixed = None
    if fixed is not None:
        test = fixed[0]
        hashes |= {file_sha256(c.path) for c in test.clips}
        recordings |= {c.group for c in test.clips if c.group != c.path.stem}
        description = test.description
    result = Guard(frozenset(hashes), frozenset(recordings), description)
    with _guard_lock:
        _guards.clear()
        _guards[key] = result
    return result
