"""Fixtures for the web app tests (Flask test client): an isolated state folder, a migrated
SQLite database, the embedded SQLite broker and a small registry holding the session's quick
model, so every endpoint runs for real without Postgres, Redis or a worker.

The registry is shared by the tests that only read it (loading a model costs seconds, and the
process keeps one predictor per models folder, like a gunicorn worker); tests that activate
versions ask for ``own_models`` and get a private copy.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from web_helpers import PASSWORD, TOKEN, build_registry


@pytest.fixture(scope="session")
def web_registry(quick_model, tmp_path_factory) -> Path:
    """quick-1 (served), quick-2 (candidate), quick-bad (rejected), broken (corrupt)."""
    return build_registry(quick_model.checkpoint, tmp_path_factory.mktemp("web-registry"))


@pytest.fixture(scope="session")
def db_template(tmp_path_factory) -> Path:
    """A migrated SQLite file, copied for each test (migrating takes longer than copying)."""
    from src import db

    path = tmp_path_factory.mktemp("web-db") / "urbansound.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    db.get_engine(url).dispose()
    return path


@pytest.fixture(scope="session")
def visuals_cache(tmp_path_factory) -> Path:
    """One cache of data set renders for the session (same data, same signature)."""
    return tmp_path_factory.mktemp("visualise")


@pytest.fixture()
def web_env(tmp_path, monkeypatch, web_registry, db_template, synthetic_data, visuals_cache):
    """Settings for one test: its own state folder and database, the shared registry."""
    from src.settings import get_settings
    from web import services

    state = tmp_path / "var"
    (state / "cache").mkdir(parents=True)
    (state / "cache" / "visualise").symlink_to(visuals_cache, target_is_directory=True)
    shutil.copy(db_template, state / "urbansound.db")
    env = {
        "URBANSOUND_STATE_DIR": str(state),
        "URBANSOUND_DATA_DIR": str(synthetic_data),
        "URBANSOUND_MODELS_DIR": str(web_registry),
        "URBANSOUND_DATABASE_URL": "",
        "URBANSOUND_BROKER_URL": "",
        "URBANSOUND_RESULT_BACKEND": "",
        "URBANSOUND_API_TOKEN": TOKEN,
        "URBANSOUND_ADMIN_PASSWORD": PASSWORD,
        "URBANSOUND_SECRET_KEY": "test-secret",
        "URBANSOUND_TORCH_THREADS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    services.reset_probe_cache()
    yield get_settings()
    services.reset_probe_cache()
    get_settings.cache_clear()


@pytest.fixture()
def own_models(web_env, tmp_path, monkeypatch, web_registry) -> Path:
    """A private copy of the registry, for tests that change which version is served."""
    from src.settings import get_settings

    models = tmp_path / "models"
    shutil.copytree(web_registry, models)
    monkeypatch.setenv("URBANSOUND_MODELS_DIR", str(models))
    get_settings.cache_clear()
    return models


@pytest.fixture()
def make_app(web_env) -> Iterator[Callable]:
    """``make_app(**config)``: a fresh app on the current environment (CSRF off unless asked)."""
    from src.settings import get_settings

    def make(**config):
        from web import create_app

        get_settings.cache_clear()
        return create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, **config})

    yield make


@pytest.fixture()
def app(make_app):
    return make_app()


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def admin_client(client):
    """A test client logged in as administrator."""
    response = client.post("/login", data={"password": PASSWORD})
    assert response.status_code == 302
    return client


@pytest.fixture(scope="session")
def clip_path(synthetic_data) -> Path:
    """A synthetic siren clip (always available, unlike the shared real clips)."""
    return sorted((synthetic_data / "test" / "siren").glob("*.wav"))[0]


@pytest.fixture(scope="session")
def clip(clip_path) -> bytes:
    return clip_path.read_bytes()


@pytest.fixture()
def no_sender():
    """Queue nothing (no broker traffic) while a test requests retrains."""
    from src import jobs

    sent: list[str] = []
    jobs.set_sender(sent.append)
    yield sent
    jobs.set_sender(None)


@pytest.fixture(autouse=True)
def _finish_background_renders():
    """Pages start data set renders in a thread; finish them inside the test that started
    them, so they neither compete with later tests for the CPU nor outlive the session."""
    yield
    from web import ui

    for thread in list(ui._visual_threads.values()):
        thread.join(timeout=300)
