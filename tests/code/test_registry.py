"""The model registry: immutable versions, an atomic pointer, crash safety and rollback.

Checkpoints here are tiny but real: ``torch.save`` of a dict with the keys the registry
needs and one small tensor, loaded back with ``weights_only=True`` like the real ones.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from src import registry
from src.registry import RegistryError


class Evil:
    """An object a plain ``torch.load`` would unpickle (and a crafted one could run code)."""


def make_ckpt(folder: Path, version: str, parent: str | None = None, f1: float = 0.5,
              seed: int = 0) -> Path:
    path = folder / "tmp" / f"{version}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": registry.FORMAT,
        "version": version,
        "parent": parent,
        "created_at": "2026-11-26T15:00:00+00:00",
        "classes": ["a", "b"],
        "feature_config": {"sample_rate": 22050},
        "metrics": {"macro_f1": f1, "accuracy": f1 + 0.1},
        "data": {"n": 10 + seed},
        "state_dict": {"w": torch.randn(4, generator=torch.Generator().manual_seed(seed))},
    }, path)
    return path


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


def publish(tmp_path: Path, models: Path, version: str, parent: str | None = None,
            **kw) -> Path:
    return registry.publish(make_ckpt(tmp_path, version, parent, **kw), version,
                            models_dir=models)


# --------------------------------------------------------------------------- basics

def test_new_version_names_sort_and_are_unique():
    names = [registry.new_version_name() for _ in range(200)]
    assert len(set(names)) == 200
    for name in names:
        assert registry.check_version_name(name) == name
    from datetime import UTC, datetime

    early = registry.new_version_name(datetime(2026, 1, 1, tzinfo=UTC))
    late = registry.new_version_name(datetime(2026, 1, 2, tzinfo=UTC))
    assert early < late


def test_publish_activate_list(tmp_path, models):
    path = publish(tmp_path, models, "v1", f1=0.6)
    assert path == models / "v1.pt" and path.is_file()
    assert registry.current_signature(models) is None
    with pytest.raises(RegistryError, match="No usable model"):
        registry.read_pointer(models) or registry.current(tmp_path / "elsewhere")

    registry.activate("v1", models_dir=models)
    assert registry.current(models) == ("v1", path)
    pointer = registry.read_pointer(models)
    assert pointer["version"] == "v1" and pointer["file"] == "v1.pt"
    assert pointer["sha256"] == registry.file_sha256(path) and pointer["activated_at"]

    publish(tmp_path, models, "v2", parent="v1", f1=0.7, seed=1)
    [v2, v1] = registry.list_versions(models)
    assert (v2.version, v2.status, v2.active, v2.parent) == ("v2", "candidate", False, "v1")
    assert (v1.version, v1.status, v1.active) == ("v1", "active", True)
    assert v1.metrics == {"macro_f1": 0.6, "accuracy": pytest.approx(0.7)}
    assert v1.data == {"n": 10} and v1.classes == ["a", "b"] and v1.sha256 == pointer["sha256"]

    registry.activate("v2", models_dir=models)
    statuses = {i.version: i.status for i in registry.list_versions(models)}
    assert statuses == {"v2": "active", "v1": "retired"}
    assert registry.read_pointer(models)["previous"] == "v1"


def test_versions_are_immutable(tmp_path, models):
    publish(tmp_path, models, "v1")
    before = (models / "v1.pt").read_bytes()
    with pytest.raises(RegistryError, match="already exists"):
        publish(tmp_path, models, "v1", seed=99)  # same name, other weights
    assert (models / "v1.pt").read_bytes() == before
    assert publish(tmp_path, models, "v1") == models / "v1.pt"  # same bytes: a no-op
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temp files left


def test_bad_names_and_files_are_refused(tmp_path, models):
    ckpt = make_ckpt(tmp_path, "v1")
    with pytest.raises(RegistryError, match="says it is version 'v1'"):
        registry.publish(ckpt, "v9", models_dir=models)
    for bad in ("../escape", "a/b", "", ".hidden", "x.pt", "a" * 101):
        with pytest.raises(RegistryError, match="Invalid version name"):
            registry.activate(bad, models_dir=models)
    with pytest.raises(RegistryError, match="Unknown model version"):
        registry.activate("nope", models_dir=models)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(RegistryError, match="corrupt"):
        registry.publish(garbage, "g", models_dir=models)

    evil = tmp_path / "evil.pt"
    torch.save({"format": registry.FORMAT, "obj": Evil()}, evil)
    with pytest.raises(RegistryError, match="not a safe checkpoint"):
        registry.publish(evil, "evil", models_dir=models)

    incomplete = tmp_path / "incomplete.pt"
    torch.save({"format": registry.FORMAT, "version": "inc"}, incomplete)
    with pytest.raises(RegistryError, match="missing"):
        registry.publish(incomplete, models_dir=models)
    assert not models.exists() or not list(models.glob("*.pt"))


# --------------------------------------------------------------------------- atomic swap

def test_pointer_swap_is_atomic_for_readers(tmp_path, models, caplog):
    """A reader hammering ``current()`` while another thread flips the pointer hundreds of
    times never sees an error, a fallback or a version that is not one of the two."""
    publish(tmp_path, models, "va")
    publish(tmp_path, models, "vb", seed=1)
    registry.activate("va", models_dir=models)
    paths = {"va": models / "va.pt", "vb": models / "vb.pt"}
    stop = threading.Event()
    seen: set[str] = set()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                version, path = registry.current(models)
                raw = json.loads((models / registry.POINTER).read_text())
                if paths.get(version) != path or raw["version"] not in paths:
                    problems.append(f"{version} {path} {raw}")
                seen.add(version)
                reads[0] += 1
            except Exception as exc:
                problems.append(repr(exc))

    caplog.set_level(logging.WARNING, logger="src.registry")
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(200):
            registry.activate("vb" if i % 2 == 0 else "va", models_dir=models)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert problems == []
    assert seen == {"va", "vb"} and reads[0] > 100
    assert not [r for r in caplog.records if "instead" in r.getMessage()]
    assert not [p for p in models.iterdir() if p.name.startswith(".")]


def test_signature_changes_on_every_activation(tmp_path, models):
    publish(tmp_path, models, "v1")
    publish(tmp_path, models, "v2", seed=1)
    signatures = set()
    for version in ("v1", "v2", "v1"):
        registry.activate(version, models_dir=models)
        signatures.add(registry.current_signature(models))
    assert len(signatures) == 3 and None not in signatures


def test_crash_before_the_pointer_is_replaced_keeps_the_old_model(tmp_path, models,
                                                                   monkeypatch):
    publish(tmp_path, models, "v1")
    registry.activate("v1", models_dir=models)
    publish(tmp_path, models, "v2", parent="v1", seed=1)  # the new file is written...

    def killed(src, dst):  # ...and the process dies before the rename
        raise OSError("killed")

    monkeypatch.setattr(registry.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        registry.activate("v2", models_dir=models)
    monkeypatch.undo()

    assert registry.current(models) == ("v1", models / "v1.pt")
    assert registry.read_pointer(models)["version"] == "v1"
    assert not [p for p in models.iterdir() if p.name.startswith(".")]
    registry.activate("v2", models_dir=models)  # a retry then succeeds
    assert registry.current(models)[0] == "v2"


def test_crash_while_publishing_leaves_no_partial_version(tmp_path, models, monkeypatch):
    publish(tmp_path, models, "v1")
    registry.activate("v1", models_dir=models)

    def killed(src, dst):
        raise KeyboardInterrupt  # like a SIGINT between the fsync and the link

    monkeypatch.setattr(registry.os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path, models, "v2", seed=1)
    monkeypatch.undo()
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "HISTORY.jsonl", "v1.pt"]
    assert registry.current(models)[0] == "v1"


def test_corrupt_or_missing_pointer_falls_back_with_a_log_line(tmp_path, models, caplog):
    publish(tmp_path, models, "v1")
    publish(tmp_path, models, "v2", seed=1)
    publish(tmp_path, models, "v3", seed=2)  # newest, but never activated: a candidate
    registry.activate("v1", models_dir=models)
    registry.activate("v2", models_dir=models)
    caplog.set_level(logging.WARNING, logger="src.registry")

    (models / registry.POINTER).write_text('{"version": "v2", "fi')  # torn write
    assert registry.current(models) == ("v2", models / "v2.pt")  # last activated, not v3
    assert "unreadable" in caplog.text and "serving v2 instead" in caplog.text

    caplog.clear()
    (models / registry.POINTER).unlink()
    (models / "v2.pt").write_bytes(b"bit rot")  # and the last activated one is corrupt
    assert registry.current(models)[0] == "v1"
    assert "missing" in caplog.text

    (models / registry.POINTER).write_text(json.dumps({"version": "gone"}))
    assert registry.current(models)[0] == "v1"  # a pointer to a missing file

    (models / registry.HISTORY).unlink()  # nothing was ever activated: newest usable
    (models / registry.POINTER).unlink()
    assert registry.current(models)[0] == "v3"

    for p in models.glob("*.pt"):
        p.write_bytes(b"all gone")
    with pytest.raises(RegistryError, match="No usable model"):
        registry.current(models)


def test_a_file_changed_after_activation_is_never_served(tmp_path, models, caplog):
    """The pointer records the file's sha256: a valid checkpoint copied over the served one
    (same name, other weights) is neither followed nor picked by the fallback."""
    publish(tmp_path, models, "v1")
    publish(tmp_path, models, "v2", seed=1)
    registry.activate("v1", models_dir=models)
    registry.activate("v2", models_dir=models)
    caplog.set_level(logging.WARNING, logger="src.registry")
    impostor = make_ckpt(tmp_path / "impostor", "v2", seed=7)
    os.replace(impostor, models / "v2.pt")

    check = registry.check_pointer(models)
    assert check.state == "hash_mismatch" and "v2.pt has sha256" in check.message
    assert registry.current(models) == ("v1", models / "v1.pt")
    assert "no longer matches the sha256" in caplog.text and "serving v1 instead" in caplog.text
    registry.activate("v1", models_dir=models)  # an operator's fix
    assert registry.check_pointer(models).ok


@pytest.mark.parametrize("pointer", [b"", b"garbage", b"[]", b'{"version": 3}',
                                     b'{"version": "../etc/passwd", "sha256": "00"}',
                                     b'{"version": "v1"}'])
def test_an_unreadable_pointer_is_reported_as_such(tmp_path, models, pointer):
    publish(tmp_path, models, "v1")
    registry.activate("v1", models_dir=models)
    (models / registry.POINTER).write_bytes(pointer)
    check = registry.check_pointer(models)
    assert check.state == "unreadable" and "CURRENT is unreadable" in check.message
    assert registry.current(models)[0] == "v1"  # the last activated file, still intact


# --------------------------------------------------------------------------- reject, rollback

def test_reject(tmp_path, models, caplog):
    publish(tmp_path, models, "v1")
    registry.activate("v1", models_dir=models)
    publish(tmp_path, models, "v2", parent="v1", seed=1)
    registry.reject("v2", "macro-F1 0.41 < served 0.52", models_dir=models)
    with pytest.raises(RegistryError, match="rejected"):
        registry.activate("v2", models_dir=models)
    with pytest.raises(RegistryError, match="being served"):
        registry.reject("v1", "no", models_dir=models)
    info = {i.version: i for i in registry.list_versions(models)}["v2"]
    assert info.status == "rejected" and "0.41" in info.reason

    (models / registry.POINTER).unlink()
    (models / registry.HISTORY).unlink()
    assert registry.current(models)[0] == "v1"  # the fallback never serves a rejected one

    registry.activate("v2", models_dir=models, force=True)  # a person overrides the gate
    assert registry.current(models)[0] == "v2"


def test_rollback_walks_the_lineage(tmp_path, models):
    publish(tmp_path, models, "v1")
    registry.activate("v1", models_dir=models)
    for i, (version, parent) in enumerate((("v2", "v1"), ("v3", "v2")), start=1):
        publish(tmp_path, models, version, parent=parent, seed=i)
        registry.activate(version, models_dir=models)

    assert registry.rollback(models_dir=models) == "v2"
    assert registry.current(models)[0] == "v2"
    assert registry.rollback(models_dir=models) == "v1"
    with pytest.raises(RegistryError, match="Nothing to roll back to"):
        registry.rollback(models_dir=models)


def test_rollback_without_lineage_returns_to_the_previous_model(tmp_path, models):
    publish(tmp_path, models, "base")
    publish(tmp_path, models, "other", seed=1)  # trained separately: no parent
    registry.activate("base", models_dir=models)
    registry.activate("other", models_dir=models)
    assert registry.rollback(models_dir=models) == "base"


# --------------------------------------------------------------------------- database mirror

def test_database_mirror(tmp_path, models):
    from src import db

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    db.upgrade(url)

    def statuses() -> dict[str, str]:
        with db.session_scope(url) as s:
            return {r.version: r.status for r in s.query(db.ModelVersion)}

    with db.session_scope(url) as session:
        registry.publish(make_ckpt(tmp_path, "v1", f1=0.6), models_dir=models, session=session,
                         job_id="job-1")
        registry.activate("v1", models_dir=models, session=session)
    publish(tmp_path, models, "v2", parent="v1", seed=1)  # published without the database
    with db.session_scope(url) as session:
        registry.activate("v2", models_dir=models, session=session)
    assert statuses() == {"v1": "retired", "v2": "active"}

    with db.session_scope(url) as session:
        registry.rollback(models_dir=models, session=session)
        publish(tmp_path, models, "v3", parent="v1", seed=2)
        registry.reject("v3", "worse", models_dir=models, session=session)
    assert statuses() == {"v1": "active", "v2": "retired", "v3": "rejected"}
    with db.session_scope(url) as session:
        row = session.get(db.ModelVersion, "v1")
        assert row.metrics["macro_f1"] == 0.6 and row.job_id == "job-1"
        assert row.sha256 == registry.file_sha256(models / "v1.pt")
        assert row.activated_at is not None and row.message is None
        infos = {i.version: i for i in registry.list_versions(models, session=session)}
    assert infos["v3"].reason == "worse" and infos["v1"].active

    # the database drifted (a CLI activation without it): sync_db repairs it
    registry.activate("v2", models_dir=models)
    (models / "v4.pt").write_bytes((models / "v2.pt").read_bytes())  # a copy renamed by hand
    with db.session_scope(url) as session:
        registry.sync_db(session, models)
    assert statuses() == {"v1": "retired", "v2": "active", "v3": "rejected"}
    v4 = {i.version: i for i in registry.list_versions(models)}["v4"]
    assert v4.status == "corrupt" and "holds version 'v2'" in v4.error
    with pytest.raises(RegistryError, match="renamed or copied"):
        registry.activate("v4", models_dir=models)


def test_models_cli(tmp_path, models, monkeypatch):
    from typer.testing import CliRunner

    from src.cli.ops import models_app
    from src.settings import get_settings

    monkeypatch.setenv("URBANSOUND_MODELS_DIR", str(models))
    monkeypatch.setenv("URBANSOUND_STATE_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    try:
        publish(tmp_path, models, "v1", f1=0.61)
        publish(tmp_path, models, "v2", parent="v1", f1=0.72, seed=1)
        runner = CliRunner()
        result = runner.invoke(models_app, ["activate", "v1"])
        assert result.exit_code == 0 and "serving v1" in result.output
        result = runner.invoke(models_app, ["list"])
        assert result.exit_code == 0
        assert "* v1" in result.output and "macro_f1 0.610" in result.output
        result = runner.invoke(models_app, ["list", "--json"])
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert [(r["version"], r["status"]) for r in rows] == [("v2", "candidate"),
                                                              ("v1", "active")]
        result = runner.invoke(models_app, ["activate", "../x"])
        assert result.exit_code == 1 and "Invalid version name" in result.output
        assert "Traceback" not in result.output
    finally:
        get_settings.cache_clear()
