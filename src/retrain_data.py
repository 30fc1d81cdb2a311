"""What a retrain learns from and what it is graded on, decided in one place.

The quality gate is only worth something if the candidate and the served model are graded on
the same clips, and if none of those clips was ever trained on. So every checkpoint carries its
**test-set spec** (``data["test_set"]``: folds, description, content hashes and recording ids of
the test clips), and every retrain resolves it the same way:

1. **the base model's test folds** in the data set (UrbanSound8K layout, or an import that kept
   the folds in its manifest): train on the other folds;
2. else **``data_dir/test``** (class-per-folder), training on ``data_dir/train``;
3. else — no data set installed, the newcomer's case — **a recording-grouped slice of the
   uploads**, held out for good (``ClipRole.test``): about a fifth of each batch of new
   recordings, at least one. A held-out recording never trains, so the slice grows with the
   uploads and stays honest. The model learns from the rest, with the served model as its
   teacher (learning without forgetting: with no base data, plain fine-tuning on a few
   classes would forget the others where the gate cannot see it).

``plan`` answers, without changing anything, what a retrain would use or what is missing (the
Training page shows it before the button; ``request_retrain`` refuses a retrain that could
only fail). ``prepare`` does the same for a running job, fixing the held-out slice for good.
The test set itself, and the leakage guard the upload path runs, are ``testset``'s.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any

from .datasets import Clip
from .db import ClipRole, UploadedClip, session_scope
from .errors import UserError
from .ingest import clips_as_dataset, split_uploads, upload_group
from .settings import Settings, get_settings
from .testset import RetrainError, TestSet, file_sha256, fixed_test, spec_for, spec_of

log = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.2  # of each batch of new recordings, when the uploads are the test set
HOLDOUT_EVERY = round(1 / HOLDOUT_FRACTION)
FIX_DATA = ("`urbansound data import DIR` (an UrbanSound8K copy) or `urbansound data download`")
FIX_UPLOAD = ("upload labelled clips: the Data page, `urbansound data upload DIR` or "
              "POST /api/v1/uploads")


@dataclass
class RetrainData:
    base: list[Clip]  # training clips besides the new uploads
    base_description: str
    new: list[Clip]  # unused accepted uploads that train
    new_ids: list[int]
    test: TestSet
    spec: dict[str, Any]  # the test-set spec the candidate carries forward
    dropped: int = 0  # uploads left out because they belong to the test set


# --------------------------------------------------------------------------- uploads

def _hold_out(unused: list[UploadedClip], used: list[UploadedClip], held: list[UploadedClip]
              ) -> set[int]:
    """Ids of unused uploads to hold out: every clip of an already held-out recording, and a
    fixed, hash-ordered fifth (at least one, if nothing is held out yet) of the new recordings
    — never all of them, so something is left to learn from."""
    held_groups = {upload_group(r) for r in held}
    known = held_groups | {upload_group(r) for r in used}
    groups = {r.id: upload_group(r) for r in unused}
    new_groups = sorted({g for g in groups.values() if g not in known},
                        key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    n = 0
    if len(new_groups) > 1:
        n = round(HOLDOUT_FRACTION * len(new_groups))
        n = min(max(n, 0 if held else 1), len(new_groups) - 1)
    chosen = held_groups | set(new_groups[:n])
    return {i for i, g in groups.items() if g in chosen}


def _in_test(clip: Clip, spec: dict[str, Any], test: list[Clip]) -> bool:
    hashes = set(spec.get("sha256") or [])
    recordings = set(spec.get("recordings") or []) | {c.group for c in test}
    return clip.group in recordings or (bool(hashes) and file_sha256(clip.path) in hashes)


# --------------------------------------------------------------------------- plan / prepare

def _resolve(session: Any, spec: dict[str, Any], lineage: list[str], settings: Settings,
             commit_roles: bool) -> tuple[RetrainData, list[dict[str, str]], int]:
    """The data of a retrain, and what is missing (a retrain may run only when nothing is);
    with ``commit_roles`` the held-out slice is recorded (flushed; the caller commits). Third
    item: the unused uploads (before the hold-out)."""
    unused, used, held = split_uploads(session, lineage)
    fixed = fixed_test(spec, settings.data_dir)
    missing: list[dict[str, str]] = []
    hold: set[int] = set()
    if fixed is not None:
        test, base, base_how = fixed
        new_rows = unused
    else:
        hold = _hold_out(unused, used, held)
        new_rows = [r for r in unused if r.id not in hold]
        held_rows = held + [r for r in unused if r.id in hold]
        test = TestSet("uploads", clips_as_dataset(held_rows, settings.uploads_dir),
                       f"{len(held_rows)} held-out upload(s) from "
                       f"{len({upload_group(r) for r in held_rows})} recording(s); no data set "
                       f"installed at {settings.data_dir}")
        base, base_how = [], "none (no data set installed)"
        if not test.clips and unused:
            missing.append({"what": "a test set for the quality gate: no data set is installed, "
                                    "and the uploads come from a single recording, so none "
                                    "can be held out",
                            "fix": f"{FIX_DATA}, or upload clips of another recording"})
    base = base + clips_as_dataset(used, settings.uploads_dir)
    if used:
        base_how += f" + {len(used)} upload(s) of earlier retrains"
    new = clips_as_dataset(new_rows, settings.uploads_dir)
    on_disk = {c.path for c in new}
    new_ids = [r.id for r in new_rows if settings.uploads_dir / r.path in on_disk]
    leaked = [c for c in new + base if c.source == "upload" and _in_test(c, spec, test.clips)]
    if leaked:  # uploaded before the test set was known (a data set installed later)
        gone = {c.path for c in leaked}
        new_ids = [i for i, c in zip(new_ids, new, strict=True) if c.path not in gone]
        new = [c for c in new if c.path not in gone]
        base = [c for c in base if c.path not in gone]
    if not new and not (unused and not test.clips):
        what = "new uploads: every accepted upload has been learnt already"
        fix = FIX_UPLOAD
        if not (unused or used or held):
            what = "uploads: none accepted yet"
            if test.kind == "uploads":
                fix += (" — from at least 2 recordings, since with no data set installed a "
                        f"fifth of them is held out as the test set (or install one: {FIX_DATA})")
        missing.append({"what": what, "fix": fix})
    if test.clips and len(test.clips) < settings.gate_min_test_clips:
        missing.append(too_small(test, settings.gate_min_test_clips))
    if commit_roles and test.kind == "uploads" and not missing:  # fixed for good from now on
        for r in unused:
            r.role = ClipRole.test if r.id in hold else ClipRole.train
        session.flush()
    carried = dict(spec)
    if test.kind != "uploads" and not missing:  # complete the spec (older ones lack hashes)
        carried.update(spec_for(test.clips, test.kind, test.description, test.folds))
    data = RetrainData(base, base_how, new, new_ids, test, carried, dropped=len(leaked))
    return data, missing, len(unused)


def too_small(test: TestSet, minimum: int) -> dict[str, str]:
    """The missing item for a test set too small to gate on. Measured on 5 Dec: on a fresh
    install, 16 uploads held out one clip, and the gate promoted a fine-tune of 86918b that
    got 11 fewer of fold 3's 387 clips right; fine-tuned on 16 clips of half of fold 3's
    recordings, it got 10 fewer of the other half's 188. With 30, one clip is 3 points."""
    n = len(test.clips)
    what = (f"a test set the quality gate can judge by: it has {n} clip(s) ({test.description}) "
            f"and needs at least {minimum}; on fewer, a model that got worse on unseen "
            "recordings is promoted whenever it keeps those few right")
    if test.kind == "uploads":
        fix = (f"{FIX_UPLOAD} — about {HOLDOUT_EVERY * (minimum - n)} more, from recordings "
               "not uploaded yet (a fifth of each batch of new recordings is held out) — or "
               f"install a data set: {FIX_DATA}")
    else:
        fix = ("add clips to the data set's test set (its test fold(s) or data/test; "
               "`urbansound data stats` counts them)")
    fix += ("; or, knowing the gate then proves less, set URBANSOUND_GATE_MIN_TEST_CLIPS "
            f"to {n}")
    return {"what": what, "fix": fix}


def plan(settings: Settings | None = None) -> dict[str, Any]:
    """What a retrain would use now, or exactly what is missing and the command that fixes it.
    Changes nothing. Raises ``DatabaseUnavailable`` when the database is down."""
    from . import registry

    settings = settings or get_settings()
    try:
        version, path = registry.current(settings.models_dir)
        spec = spec_of(registry.read_metadata(path))
        line = registry.lineage(version, settings.models_dir)
    except UserError as exc:
        return {"ready": False, "served_version": None, "base": {"n": 0, "description": ""},
                "new_uploads": 0, "test_set": None,
                "missing": [{"what": f"a served model ({exc})",
                             "fix": "`urbansound train --data DIR`, or restore models/"}],
                "summary": "No model is served, so there is nothing to fine-tune."}
    with session_scope(settings.db_url) as s:
        data, missing, n_unused = _resolve(s, spec, line, settings, commit_roles=False)
    test = {"kind": data.test.kind, "description": data.test.description,
            "n": len(data.test.clips)} if data.test.clips else None
    base_n = min(len(data.base), settings.retrain_base_clips or len(data.base))
    base = {"n": base_n, "description": data.base_description}
    if missing:
        return {"ready": False, "served_version": version, "base": base,
                "new_uploads": n_unused, "test_set": test, "missing": missing,
                "summary": "A retrain cannot run yet: " + "; ".join(m["what"] for m in missing)
                + "."}
    assert test is not None  # no test clips is always a missing item
    summary = (f"A retrain fine-tunes {version} on {len(data.new)} new upload(s)"
               + (f" and {base_n} base clip(s)" if base_n else "")
               + f", then grades it against the served model on {test['n']} test clip(s) "
               f"({data.test.description}).")
    if data.dropped:
        summary += f" {data.dropped} upload(s) from the test set are left out."
    return {"ready": True, "served_version": version, "base": base,
            "new_uploads": len(data.new), "test_set": test, "missing": [], "summary": summary}


def prepare(base: dict[str, Any], settings: Settings) -> RetrainData:
    """The data of a running retrain; records the held-out slice of the uploads for good."""
    from . import registry

    line = registry.lineage(base["version"], settings.models_dir)
    with session_scope(settings.db_url) as s:
        data, missing, _ = _resolve(s, spec_of(base), line, settings, commit_roles=True)
    if missing:
        raise RetrainError("Cannot retrain: " + "; ".join(
            f"{m['what']} (fix: {m['fix']})" for m in missing) + ".")
    data.base = subsample(data.base, settings.retrain_base_clips)
    return data


def subsample(clips: list[Clip], n: int, seed: int = 0) -> list[Clip]:
    """At most ``n`` clips (0 = all), drawn with a fixed seed so every retrain of a base sees
    the same subset and time per retrain stays bounded however large the data set grows."""
    if n <= 0 or len(clips) <= n:
        return list(clips)
    picked = random.Random(seed).sample(range(len(clips)), n)
    return [clips[i] for i in sorted(picked)]


