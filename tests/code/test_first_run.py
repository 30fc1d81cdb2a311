"""What a newcomer meets first: data/ exists in a clone and says what goes there, `up` says
what it found, and a request whose file was missing says its body was empty."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from web_helpers import US8K

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- data/

def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_data_readme_is_tracked_and_the_clips_are_ignored():
    if git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    readme = ROOT / "data" / "README.md"
    assert readme.is_file()
    assert git("check-ignore", "-q", "data/README.md").returncode == 1, "data/README.md ignored"
    for path in ("data/train/siren/a.wav", "data/test/manifest.csv", "data/train/manifest.csv",
                 "data/SYNTHETIC.md", "data/metadata/UrbanSound8K.csv", "data/audio/fold1/x.wav"):
        assert git("check-ignore", "-q", path).returncode == 0, f"{path} is not ignored"
    text = readme.read_text()
    for needed in ("train/<class>/", "test/<class>/", "manifest.csv", "urbansound data download",
                   "urbansound data import DIR", "urbansound data synth",
                   "Attribution-NonCommercial 3.0", "Salamon", "uploads"):
        assert needed in text, needed


# --------------------------------------------------------------------------- urbansound up

def report(monkeypatch, tmp_path, **env: str) -> list[str]:
    from src.cli.web import startup_report
    from src.settings import get_settings

    base = {"URBANSOUND_STATE_DIR": str(tmp_path / "var"),
            "URBANSOUND_DATA_DIR": str(tmp_path / "data"),
            "URBANSOUND_MODELS_DIR": str(tmp_path / "models"),
            "URBANSOUND_DATABASE_URL": "", "URBANSOUND_BROKER_URL": ""}
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        return startup_report()
    finally:
        get_settings.cache_clear()


def test_up_says_what_it_found_with_nothing_there(monkeypatch, tmp_path):
    lines = report(monkeypatch, tmp_path)
    assert [line.split(":")[0] for line in lines] == ["model", "data set", "database", "broker"]
    model, data, database, broker = lines
    assert "none" in model
    assert "none" in data and "urbansound data import DIR" in data \
        and "urbansound data download" in data and "upload clips" in data
    assert "sqlite" in database and "(embedded)" in database
    assert "sqlite" in broker and "(embedded)" in broker
    assert len(lines) == 4 and all(len(line) < 300 for line in lines)


def test_up_names_the_model_the_data_set_and_masks_passwords(monkeypatch, tmp_path,
                                                             committed_model):
    if not (US8K / "metadata" / "UrbanSound8K.csv").is_file():
        pytest.skip(f"the UrbanSound8K subset is not at {US8K}")
    import json

    models = committed_model.parent
    served = json.loads((models / "CURRENT").read_text())["version"]
    model, data, database, broker = report(
        monkeypatch, tmp_path, URBANSOUND_MODELS_DIR=str(models), URBANSOUND_DATA_DIR=str(US8K),
        URBANSOUND_DATABASE_URL="postgresql://app:s3cret@db.example:5432/urbansound",
        URBANSOUND_BROKER_URL="redis://:s3cret@cache.example:6379/0")
    assert served in model
    assert "UrbanSound8K layout" in data and "clips" in data
    assert "s3cret" not in database + broker
    assert database.endswith("app:***@db.example:5432/urbansound")
    assert broker.endswith("redis://:***@cache.example:6379/0")


def test_up_says_a_data_set_is_synthetic(monkeypatch, tmp_path, synthetic_data):
    _, data, _, _ = report(monkeypatch, tmp_path, URBANSOUND_DATA_DIR=str(synthetic_data))
    assert "SYNTHETIC" in data and "train" in data and "test" in data


# --------------------------------------------------------------------------- empty bodies

def error(response) -> dict:
    assert response.status_code == 400, response.get_data(as_text=True)
    return response.get_json()["error"]


def test_an_empty_zip_body_says_the_body_was_empty(client, auth):
    """`curl --data-binary @missing.zip` posts an empty body: say that, not "multipart"."""
    err = error(client.post("/api/v1/uploads", data=b"",
                            headers={**auth, "Content-Type": "application/zip"}))
    assert err["code"] == "no_files"
    assert "body was empty" in err["message"] and "multipart" not in err["message"]


def test_a_multipart_body_without_files_still_names_the_field(client, auth):
    err = error(client.post("/api/v1/uploads", data={"label": "siren"}, headers=auth,
                            content_type="multipart/form-data"))
    assert err["code"] == "no_files" and "'files'" in err["message"]


def test_an_empty_predict_body_says_the_body_was_empty(client):
    err = error(client.post("/api/v1/predict", data=b"",
                            headers={"Content-Type": "audio/flac"}))
    assert err["code"] == "empty" and "body was empty" in err["message"]
