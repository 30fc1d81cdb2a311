"""Paths as a newcomer has them: relative defaults (``var``, ``data``, ``models``), resolved
once when the settings load (issue 10, finding 3: every chart answered 500 because Flask's
``send_file`` resolved the relative ``var`` against the ``web`` package)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from src.settings import Settings


def test_relative_paths_become_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("STATE_DIR", "DATA_DIR", "MODELS_DIR", "DATABASE_URL", "BROKER_URL"):
        monkeypatch.delenv(f"URBANSOUND_{key}", raising=False)
    settings = Settings()
    assert settings.state_dir == tmp_path / "var"
    assert settings.data_dir == tmp_path / "data"
    assert settings.models_dir == tmp_path / "models"
    assert settings.db_url == f"sqlite:///{tmp_path / 'var' / 'urbansound.db'}"
    monkeypatch.chdir("/")  # later changes of directory change nothing
    assert settings.cache_dir == tmp_path / "var" / "cache"
    assert Settings(state_dir=Path("~") / "x").state_dir == Path.home() / "x"


@pytest.fixture()
def relative_app(web_env, web_registry, db_template, tmp_path, monkeypatch):
    """The app as ``urbansound up`` runs it from a clone: relative default paths."""
    from src.settings import get_settings
    from web import create_app, services

    root = tmp_path / "clone"
    (root / "var").mkdir(parents=True)
    shutil.copy(db_template, root / "var" / "urbansound.db")
    shutil.copytree(web_registry, root / "models")
    monkeypatch.chdir(root)
    for key in ("STATE_DIR", "DATA_DIR", "MODELS_DIR"):
        monkeypatch.setenv(f"URBANSOUND_{key}", {"STATE_DIR": "var", "DATA_DIR": "data",
                                                 "MODELS_DIR": "models"}[key])
    get_settings.cache_clear()
    services.reset_probe_cache()
    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False})
    yield app, root
    get_settings.cache_clear()


def test_chart_images_answer_with_relative_default_paths(relative_app):
    app, root = relative_app
    client = app.test_client()
    versions = client.get("/api/v1/models").get_json()["items"]
    with_cm = [v["version"] for v in versions if v["status"] in ("active", "candidate")]
    assert with_cm
    for version in with_cm:
        r = client.get(f"/training/models/{version}/confusion.png")
        assert r.status_code == 200 and r.mimetype == "image/png", (version, r.status_code)
        assert r.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "var" / "cache" / "plots").is_dir()  # written inside the clone
