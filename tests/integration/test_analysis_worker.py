"""The analysis job path through a real Celery worker and Redis (issue 14): a long recording
queued as the API queues it is analysed by ``urbansound worker`` with the served model (here
the stack's small 16-kHz, 2-s model: the windows follow its feature config), polled to the
end, and the retrain table never sees it ("one retrain at a time" is untouched)."""

from __future__ import annotations

import time

import conftest_worker as cw
import numpy as np
import pytest
import soundfile as sf
import sqlalchemy as sa

pytestmark = [pytest.mark.integration, pytest.mark.slow]

stack = cw.stack
worker = cw.worker
clean = cw.clean


def test_a_queued_analysis_is_run_by_the_worker(clean, worker, tmp_path):
    from src import analysis_jobs, db
    from web import services

    settings = clean.settings()
    rows = cw.pick(clean.rows, 1, 1)[:3]
    y = np.concatenate([sf.read(cw.clip_path(r), dtype="float32")[0] for r in rows])
    recording = tmp_path / "street.wav"
    sf.write(recording, np.stack([y, y], axis=1), 22050)
    with open(recording, "rb") as f:
        job = analysis_jobs.create(f, "street.wav", {}, settings)
    services.queue_analysis(job["id"], settings)
    deadline = time.monotonic() + 180
    while not (job := analysis_jobs.get(job["id"], settings))["done"]:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.2)
    assert job["status"] == "succeeded", (job, worker.tail())
    result = job["result"]
    assert result["file"] == "street.wav" and result["channels"] == 2
    assert result["duration_s"] == pytest.approx(len(y) / 22050, abs=0.01)
    assert result["window_s"] == 2.0  # the served model hears 2 s: its config, not a constant
    assert result["model_version"] == clean.base_version
    assert sum(result["summary"].values()) == pytest.approx(result["duration_s"], abs=1e-3)
    assert not (settings.state_dir / "analyses" / job["id"] / "audio").exists()  # API job
    with db.get_engine(clean.db_url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM training_jobs")).scalar() == 0
