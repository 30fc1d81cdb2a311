"""Retraining through a real Celery worker, Postgres and Redis, on real UrbanSound8K clips.

What is shown (issue 3): uploads → retrain → promotion with file, pointer and database row in
agreement; the quality gate refusing a candidate trained on mislabelled uploads; ``kill -9`` of
the worker mid-training leaving the served model alone, the job marked failed at the worker's
restart and the next retrain succeeding; one job for concurrent requests (threads and
processes, Postgres and SQLite); Redis down and Postgres down failing fast and clearly with
nothing half-written. Set-up and helpers: ``conftest_worker.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import conftest_worker as cw
import pytest
import sqlalchemy as sa

from src import db, jobs, registry
from src.ingest import count_unused, ingest
from src.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Fixtures from conftest_worker (assigned, not imported by name, so that test arguments do not
# read as redefinitions).
stack = cw.stack
worker = cw.worker
clean = cw.clean

WAIT_S = 240  # a retrain here takes seconds; this only bounds a broken run


@pytest.fixture(autouse=True, scope="module")
def _queue_through_celery():
    """What the web app and ``urbansound retrain`` do as they start: connect ``src.jobs`` to
    the broker (the core never imports Celery itself)."""
    from web.celery_app import install

    install()


def upload(stack: cw.Stack, rows: list[dict], label: str | None = None) -> int:
    report = ingest(cw.upload_items(rows, label), source="cli", client="test",
                    settings=stack.settings())
    assert report.n_rejected == 0, [r.to_dict() for r in report.rejected]
    return report.n_accepted


def unused(stack: cw.Stack) -> int:
    with db.session_scope(stack.db_url) as s:
        return count_unused(s, registry.served_lineage(stack.models_dir))


def served_state(stack: cw.Stack) -> tuple:
    """Everything that says which model is served: pointer content and inode, version files."""
    return (registry.read_pointer(stack.models_dir),
            registry.current_signature(stack.models_dir), cw.model_files(stack.models_dir))


def versions_of_job(stack: cw.Stack, job_id: str) -> list[str]:
    with db.get_engine(stack.db_url).connect() as conn:
        return list(conn.execute(sa.text("SELECT version FROM model_versions WHERE job_id = :j"),
                                 {"j": job_id}).scalars())


def celery_result(job_id: str):
    from web.celery_app import standalone_app

    return standalone_app().AsyncResult(job_id)


# --------------------------------------------------------------------------- through the worker

def test_uploads_retrain_promote_and_file_pointer_row_agree(clean, worker):
    n = upload(clean, cw.pick(clean.rows, 2, 4))
    updates: list[dict] = []
    job, created = jobs.request_retrain("test:promote")
    assert created and job["status"] == "queued" and job["celery_task_id"] == job["id"]

    job = jobs.wait_for_job(job["id"], WAIT_S, poll_s=0.1, on_update=updates.append)
    assert job["status"] == "succeeded", (job, worker.tail())
    assert job["promoted"] is True and job["n_new_clips"] == n
    assert job["message"].startswith(f"Promoted {job['result_version']}")
    assert re.search(r"macro-F1 \d\.\d{4} .* vs \d\.\d{4} .* served base-1", job["message"])

    version = job["result_version"]
    path = clean.models_dir / f"{version}.pt"
    sha = registry.file_sha256(path)
    pointer = registry.read_pointer(clean.models_dir)
    row = cw.version_row(clean.db_url, version)
    assert pointer["version"] == version and pointer["sha256"] == sha
    assert registry.current(clean.models_dir) == (version, path)
    assert row["status"] == "active" and row["sha256"] == sha and row["file"] == path.name
    assert row["job_id"] == job["id"] and row["parent"] == "base-1"
    assert row["metrics"]["macro_f1"] == job["metrics"]["candidate"]["macro_f1"]

    from src.prediction import Predictor

    assert Predictor(path, optimise=False).version == version  # what web processes will load

    # progress was visible while it ran (job row), and Celery agrees on the outcome
    training = [u["progress"] for u in updates if u["progress"].get("stage") == "training"]
    assert training and {"epoch", "epochs", "loss", "val_f1"} <= set(training[-1])
    assert celery_result(job["id"]).get(timeout=30)["status"] == "succeeded"

    # the uploads were absorbed by this job
    assert unused(clean) == 0

    # idempotent by job id: a redelivered message for a finished job changes nothing
    before = served_state(clean)
    from web.celery_app import send_retrain

    offset = worker.log.stat().st_size
    send_retrain(job["id"])
    deadline = time.monotonic() + 60
    while "not run: already succeeded" not in worker.text(offset):
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.2)
    assert served_state(clean) == before
    assert jobs.get_job(job["id"])["finished_at"] == job["finished_at"]


def test_gate_rejects_candidate_trained_on_mislabelled_uploads(clean, worker):
    rows = [r for r in cw.pick(clean.rows, 2, 6, skip=10) if r["class"] != "gun_shot"]
    upload(clean, rows, label="gun_shot")  # every clip deliberately labelled wrong
    before = served_state(clean)

    # A reckless LR as well: the core validates and keeps an EMA of the weights (decay 0.995),
    # which holds a short fine-tune close to the base; at this LR the damage still shows.
    job, _ = jobs.request_retrain("test:gate", {"epochs": 4, "lr": 0.5})
    job = jobs.wait_for_job(job["id"], WAIT_S, poll_s=0.2)

    assert job["status"] == "rejected", (job, worker.tail())
    assert job["promoted"] is False
    cand, served = job["metrics"]["candidate"], job["metrics"]["served"]
    assert cand["macro_f1"] < served["macro_f1"] - job["metrics"]["gate_margin"]
    assert f"{cand['macro_f1']:.4f}" in job["message"]
    assert f"{served['macro_f1']:.4f}" in job["message"]
    assert "base-1 stays served" in job["message"]

    version = job["result_version"]
    pointer, signature, files = served_state(clean)
    assert (pointer, signature) == before[:2]  # the pointer was not even rewritten
    assert registry.current(clean.models_dir)[0] == "base-1"
    assert files == sorted([*before[2], f"{version}.pt"])  # candidate kept for audit
    assert (clean.models_dir / f"{version}.rejected.json").is_file()
    row = cw.version_row(clean.db_url, version)
    assert row["status"] == "rejected" and "quality gate" in row["message"]


def test_kill_9_mid_training_leaves_model_and_next_retrain_succeeds(clean, worker):
    n = upload(clean, cw.pick(clean.rows, 2, 4, skip=4))
    before = served_state(clean)
    job, _ = jobs.request_retrain("test:kill", {"epochs": 60})

    deadline = time.monotonic() + WAIT_S
    while (cw.job_row(clean.db_url, job["id"])["progress"] or {}).get("epoch", 0) < 1:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.1)
    state = celery_result(job["id"])  # what Flower and AsyncResult see
    while state.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.state == "PROGRESS" and state.info["epoch"] >= 1

    try:
        worker.kill9()  # the Celery main process and its pool child, mid-epoch
        assert served_state(clean) == before
        assert versions_of_job(clean, job["id"]) == []
        assert cw.job_row(clean.db_url, job["id"])["status"] == "running"  # nobody knows yet
    finally:
        worker.start()  # same node name: its worker_ready hook fails the orphaned job

    dead = jobs.get_job(job["id"])
    assert dead["status"] == "failed", dead
    assert "restarted while running this job" in dead["error"]
    assert "served model was not changed" in dead["error"]
    assert served_state(clean) == before
    assert unused(clean) == n  # a failed job consumes nothing

    job2, created = jobs.request_retrain("test:after-kill")
    assert created and job2["id"] != job["id"]
    job2 = jobs.wait_for_job(job2["id"], WAIT_S, poll_s=0.2)
    assert job2["status"] == "succeeded", (job2, worker.tail())
    assert job2["n_new_clips"] == n
    assert registry.current(clean.models_dir)[0] == job2["result_version"]


def test_kill_9_of_the_pool_child_fails_the_job_on_redelivery(clean, worker):
    """The OOM-killer case: only the process running the task dies. The worker requeues the
    message (task_reject_on_worker_lost), and the redelivered task marks the job failed
    instead of running a crashed job again."""
    upload(clean, cw.pick(clean.rows, 2, 2, skip=12))
    before = served_state(clean)
    job, _ = jobs.request_retrain("test:oom", {"epochs": 60})
    deadline = time.monotonic() + WAIT_S
    while (cw.job_row(clean.db_url, job["id"])["progress"] or {}).get("epoch", 0) < 1:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.1)
    pid = int(re.search(r"\(pid (\d+) on ", cw.job_row(clean.db_url, job["id"])["worker"])[1])
    assert pid != worker.proc.pid
    os.kill(pid, signal.SIGKILL)

    while not jobs.get_job(job["id"])["done"]:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.2)
    dead = jobs.get_job(job["id"])
    assert dead["status"] == "failed" and "died mid-job" in dead["error"], dead
    assert served_state(clean) == before
    assert versions_of_job(clean, job["id"]) == []
    assert worker.proc.poll() is None  # the worker itself lives on


def test_an_analysis_does_not_wait_behind_a_retrain(clean, worker, tmp_path):
    """A retrain takes minutes; the analysis of a long recording, seconds. With one slot the
    analysis queued behind it waited for the whole retrain (and after ``job_queue_timeout_s``
    was reported failed); the worker's second slot runs it beside the retrain."""
    import numpy as np
    import soundfile as sf

    from src import analysis_jobs
    from web import services

    upload(clean, cw.pick(clean.rows, 2, 2, skip=16))
    retrain, _ = jobs.request_retrain("test:busy", {"epochs": 60})
    deadline = time.monotonic() + WAIT_S
    while (cw.job_row(clean.db_url, retrain["id"])["progress"] or {}).get("epoch", 0) < 1:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.1)
    rows = cw.pick(clean.rows, 1, 1)[:3]
    recording = tmp_path / "street.wav"
    sf.write(recording, np.concatenate([sf.read(cw.clip_path(r), dtype="float32")[0]
                                        for r in rows]), 22050)
    settings = clean.settings()
    with open(recording, "rb") as f:
        analysis = analysis_jobs.create(f, "street.wav", {}, settings)
    services.queue_analysis(analysis["id"], settings)
    while not (analysis := analysis_jobs.get(analysis["id"], settings))["done"]:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.2)
    assert analysis["status"] == "succeeded", (analysis, worker.tail())
    # the retrain was still training when the analysis ended: they ran side by side
    assert jobs.get_job(retrain["id"])["status"] == "running", worker.tail()
    done = jobs.wait_for_job(retrain["id"], WAIT_S, poll_s=0.5)
    assert done["status"] in ("succeeded", "rejected"), (done, worker.tail())


# --------------------------------------------------------------------------- one job at a time

RACER = """
import json, sys, threading
from src import jobs
results, go = [], threading.Event()
def one():
    go.wait()
    job, created = jobs.request_retrain("race", send=lambda job_id: None)
    results.append([job["id"], created])
threads = [threading.Thread(target=one) for _ in range(4)]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.readline()
go.set()
for t in threads:
    t.join()
print(json.dumps(results), flush=True)
"""


def race(url: str, n_procs: int = 3, n_threads: int = 4) -> list[list]:
    """``n_procs`` processes x 4 threads and ``n_threads`` local threads call request_retrain
    at the same instant (all released together once every process is ready)."""
    env = {**os.environ, "URBANSOUND_DATABASE_URL": url}
    procs = [subprocess.Popen([sys.executable, "-c", RACER], cwd=cw.ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(n_procs)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    results: list[list] = []
    go = threading.Event()
    settings = Settings(database_url=url)

    def local() -> None:
        go.wait()
        job, created = jobs.request_retrain("race", send=lambda job_id: None, settings=settings)
        results.append([job["id"], created])

    threads = [threading.Thread(target=local) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    go.set()
    for t in threads:
        t.join()
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        results += json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_concurrent_requests_make_one_job(clean, backend, tmp_path):
    url = clean.db_url
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'race.db'}"
        db.upgrade(url)
    # something new to learn, or every request would be refused before a job exists
    ingest(cw.upload_items(cw.pick(clean.rows, 2, 1, skip=80)[:1]), source="cli",
           settings=Settings(database_url=url))
    results = race(url)
    assert len(results) == 16
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with db.get_engine(url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM training_jobs")).scalar() == 1


def test_stale_or_dead_jobs_never_block_retraining(clean):
    from src.db import TrainingJob, utcnow

    upload(clean, cw.pick(clean.rows, 2, 1, skip=85)[:1])  # something new to learn
    long_ago = utcnow() - timedelta(hours=1)
    with db.session_scope(clean.db_url) as s:
        s.add(TrainingJob(id="stale-job", status="running", started_at=long_ago,
                          heartbeat_at=long_ago, worker="gone@elsewhere (pid 1 on elsewhere)"))
    job, created = jobs.request_retrain("test:stale", send=lambda job_id: None)
    assert created and job["id"] != "stale-job"
    stale = jobs.get_job("stale-job")
    assert stale["status"] == "failed" and "stopped sending heartbeats" in stale["error"]

    # a redelivered task whose previous process on this host is gone: marked failed, not rerun
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with db.session_scope(clean.db_url) as s:
        row = s.get(TrainingJob, job["id"])
        row.status, row.started_at, row.heartbeat_at = "running", utcnow(), utcnow()
        row.worker = f"celery@x (pid {dead.pid} on {socket.gethostname()})"
    result = jobs.run_retrain(job["id"], worker="celery@x")
    assert result["status"] == "failed" and "previous attempt died" in result["skipped"]
    assert jobs.run_retrain(job["id"])["skipped"] == "already failed"  # idempotent

    with pytest.raises(jobs.JobParamsError, match="epochs"):
        jobs.request_retrain(params={"epochs": 0})
    with pytest.raises(jobs.JobParamsError, match="Unknown"):
        jobs.request_retrain(params={"gate_margin": 1})


# --------------------------------------------------------------------------- services down

def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.cli", *args], cwd=cw.ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_redis_down_fails_fast_and_keeps_uploads(clean, monkeypatch):
    n = upload(clean, cw.pick(clean.rows, 2, 1, skip=20))
    down = "redis://127.0.0.1:1/0"
    monkeypatch.setenv("URBANSOUND_BROKER_URL", down)
    monkeypatch.setenv("URBANSOUND_RESULT_BACKEND", down)
    settings = clean.settings()
    before = served_state(clean)

    t0 = time.monotonic()
    with pytest.raises(jobs.BrokerUnavailable) as err:
        jobs.request_retrain("test:redis-down", settings=settings)
    assert time.monotonic() - t0 < 10
    message = err.value.message
    assert "broker at redis://127.0.0.1:1/0 is unreachable" in message
    assert "uploads are kept" in message

    assert unused(clean) == n  # accepted uploads stay, files included
    with db.session_scope(clean.db_url) as s:
        from src.ingest import clips_as_dataset, unused_clips

        waiting = unused_clips(s, registry.served_lineage(clean.models_dir))
        assert len(clips_as_dataset(waiting, settings.uploads_dir)) == n
    failed = jobs.get_job(err.value.job["id"])
    assert failed["status"] == "failed" and failed["error"] == message  # it blocks nothing
    assert served_state(clean) == before

    with pytest.raises(jobs.BrokerUnavailable):
        jobs.check_broker(settings)

    out = cli("retrain")  # the shell says the same, in one line
    assert out.returncode == 1
    assert out.stderr.startswith("error: Could not queue the retrain job") and \
        "Traceback" not in out.stderr

    monkeypatch.setenv("URBANSOUND_BROKER_URL", cw.REDIS_URL)
    job, created = jobs.request_retrain("test:redis-back", send=lambda job_id: None,
                                        settings=clean.settings())
    assert created and job["status"] == "queued"


def test_postgres_down_fails_fast_and_writes_nothing(clean, monkeypatch, closed_port_url):
    queue = cw.redis_client()
    queued_before = queue.llen("urbansound")
    before = served_state(clean)
    monkeypatch.setenv("URBANSOUND_DATABASE_URL", closed_port_url)

    t0 = time.monotonic()
    with pytest.raises(db.DatabaseUnavailable, match="Database unavailable"):
        jobs.request_retrain("test:pg-down", settings=clean.settings())
    assert time.monotonic() - t0 < 15
    assert queue.llen("urbansound") == queued_before  # nothing was sent to the worker
    assert served_state(clean) == before

    out = cli("retrain")
    assert out.returncode == 1
    assert out.stderr.startswith("error: Database unavailable") and "Traceback" not in out.stderr


def set_connections(admin: sa.Engine, database: str, allowed: bool) -> None:
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = :d AND pid <> pg_backend_pid()"),
                         {"d": database})


def test_postgres_lost_mid_job_publishes_nothing(clean, pg_admin, monkeypatch):
    """The database goes away during training (in-process run): training may finish, but the
    candidate is never published, the pointer never moves, no upload is consumed; once the
    database is back, the silent job is failed by the heartbeat timeout."""
    n = upload(clean, cw.pick(clean.rows, 2, 2, skip=24))
    job, _ = jobs.request_retrain("test:pg-lost", send=lambda job_id: None)
    before = served_state(clean)
    database = sa.make_url(clean.db_url).database
    cut: list[bool] = []

    def on_progress(progress: dict) -> None:
        if progress.get("stage") == "training" and not cut:
            set_connections(pg_admin, database, allowed=False)
            cut.append(True)

    try:
        with pytest.raises(db.DatabaseUnavailable):
            jobs.run_retrain(job["id"], on_progress=on_progress, worker="inproc@test")
    finally:
        set_connections(pg_admin, database, allowed=True)
    assert cut

    assert served_state(clean) == before
    assert versions_of_job(clean, job["id"]) == []
    assert not list((clean.state_dir / "tmp").glob("*.pt"))  # no stray candidate either
    assert unused(clean) == n
    assert cw.job_row(clean.db_url, job["id"])["status"] == "running"

    monkeypatch.setenv("URBANSOUND_JOB_STALE_AFTER_S", "1")
    time.sleep(1.5)
    failed = jobs.get_job(job["id"], settings=clean.settings())
    assert failed["status"] == "failed" and "stopped sending heartbeats" in failed["error"]


def test_retrain_command_waits_and_reports(clean, worker):
    upload(clean, cw.pick(clean.rows, 2, 1, skip=30))
    out = cli("retrain", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout.strip().splitlines()[-1])
    assert job["status"] in ("succeeded", "rejected") and job["message"]
    assert out.stderr.startswith(f"queued: job {job['id']}")
    assert "epoch" in out.stderr  # progress lines while it ran
    assert Path(clean.models_dir / f"{job['result_version']}.pt").is_file()


# ------------------------------------------------------------------ the loop, turn after turn

def checkpoint_of(stack: cw.Stack, version: str) -> dict:
    from src.model import load_checkpoint

    return load_checkpoint(stack.models_dir / f"{version}.pt")


def test_three_promotions_a_rollback_and_a_fourth_retrain(clean, worker):
    """Issue 10, finding 2: every published checkpoint carries what the next retrain needs
    (its test set, hashes and recordings included), so the loop keeps turning."""
    served = ["base-1"]
    for turn in range(3):
        upload(clean, cw.pick(clean.rows, 2, 1, skip=30 + turn))
        job, _ = jobs.request_retrain(f"test:turn-{turn}")
        job = jobs.wait_for_job(job["id"], WAIT_S, poll_s=0.2)
        assert job["status"] == "succeeded", (job, worker.tail())
        assert "fold(s) [3]" in job["message"] and f"n={job['metrics']['n_test']}" in job["message"]
        ckpt = checkpoint_of(clean, job["result_version"])
        spec = ckpt["data"]["test_set"]
        assert ckpt["parent"] == served[-1] and ckpt["data"]["lineage"][0] == served[-1]
        assert spec["kind"] == "folds" and spec["folds"] == [3]
        assert len(spec["sha256"]) == spec["n"] == job["metrics"]["n_test"] > 0
        assert spec["recordings"] and ckpt["metrics"]["test_folds"] == [3]
        served.append(job["result_version"])

    with db.session_scope(clean.db_url) as s:
        assert registry.rollback(models_dir=clean.models_dir, session=s) == served[2]
    assert registry.current(clean.models_dir)[0] == served[2]

    upload(clean, cw.pick(clean.rows, 2, 1, skip=40))
    job, _ = jobs.request_retrain("test:after-rollback")
    job = jobs.wait_for_job(job["id"], WAIT_S, poll_s=0.2)
    assert job["status"] in ("succeeded", "rejected"), (job, worker.tail())
    assert job["base_version"] == served[2] and "fold(s) [3]" in job["message"]
    assert checkpoint_of(clean, job["result_version"])["parent"] == served[2]


def test_without_a_data_set_the_gate_uses_held_out_uploads(clean, tmp_path):
    """Issue 10, finding 1: no data set installed (a newcomer's clone) — the retrain learns
    from the uploads and is graded on a held-out, recording-grouped slice of them; the slice
    is fixed for good, grows with new recordings, and never trains."""
    from src.db import ClipRole, UploadedClip

    # two held-out clips could not judge a candidate (see the next test): the bar is lowered
    # to what this test's ten recordings give, to follow the slice across two retrains
    settings = clean.settings(data_dir=tmp_path / "no-data", gate_min_test_clips=2)
    plan = jobs.retrain_plan(settings)
    assert plan["ready"] is False and "upload" in plan["missing"][0]["fix"]
    with pytest.raises(jobs.RetrainNotReady):  # refused: no job that could only fail
        jobs.request_retrain("test:too-early", send=lambda _: None, settings=settings)

    rows = cw.pick(clean.rows, 2, 1, skip=50)  # one clip per class: ten recordings
    n = ingest(cw.upload_items(rows), source="cli", settings=settings).n_accepted
    plan = jobs.retrain_plan(settings)
    assert plan["ready"] and plan["test_set"]["kind"] == "uploads"
    assert plan["test_set"]["n"] == 2 and plan["new_uploads"] == n - 2

    def retrain() -> dict:
        job, _ = jobs.request_retrain("test:no-data", send=lambda _: None, settings=settings)
        return jobs.run_retrain(job["id"], settings=settings)

    first = retrain()
    assert first["status"] in ("succeeded", "rejected"), first
    assert "held-out upload(s)" in first["message"] and "n=2" in first["message"]
    assert "recorded macro-F1" in first["message"]  # the served model's own figures, named
    with db.session_scope(clean.db_url) as s:
        held = set(s.scalars(sa.select(UploadedClip.sha256)
                             .where(UploadedClip.role == ClipRole.test)))
    assert len(held) == 2

    more = ingest(cw.upload_items(cw.pick(clean.rows, 2, 1, skip=60)), source="cli",
                  settings=settings).n_accepted
    second = retrain()
    assert second["status"] in ("succeeded", "rejected"), second
    with db.session_scope(clean.db_url) as s:
        now_held = set(s.scalars(sa.select(UploadedClip.sha256)
                                 .where(UploadedClip.role == ClipRole.test)))
    assert held < now_held  # the old slice stays, new recordings add to it
    assert f"n={len(now_held)}" in second["message"]
    if first["status"] == "succeeded":  # the first retrain's uploads are rehearsed, not new
        assert second["metrics"]["n_new"] == more - (len(now_held) - len(held))
        assert second["metrics"]["n_train_base"] == first["metrics"]["n_new"]


def test_a_test_set_too_small_to_judge_refuses_the_retrain(clean, tmp_path):
    """With the default settings, a first batch of uploads and no data set hold out two clips:
    too few for the gate (on one clip it promoted a fine-tune that had got 11 of fold 3's 387
    clips fewer right). The plan names the gap and both fixes, a retrain is refused before any
    job exists, and nothing is fixed as held out; more recordings, or a lowered bar, unblock."""
    from src.db import TrainingJob, UploadedClip

    settings = clean.settings(data_dir=tmp_path / "no-data")
    assert settings.gate_min_test_clips == 30
    n = ingest(cw.upload_items(cw.pick(clean.rows, 2, 1, skip=50)), source="cli",
               settings=settings).n_accepted
    plan = jobs.retrain_plan(settings)
    assert plan["ready"] is False and plan["test_set"]["n"] == 2, plan
    [gap] = plan["missing"]
    assert "it has 2 clip(s)" in gap["what"] and "needs at least 30" in gap["what"], gap
    assert "upload" in gap["fix"] and "data import" in gap["fix"], gap
    assert "URBANSOUND_GATE_MIN_TEST_CLIPS to 2" in gap["fix"], gap
    with pytest.raises(jobs.RetrainNotReady, match="needs at least 30") as refused:
        jobs.request_retrain("test:too-small", send=lambda _: None, settings=settings)
    assert refused.value.status == 409
    with db.session_scope(clean.db_url) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(TrainingJob)) == 0
        assert set(s.scalars(sa.select(UploadedClip.role))) == {None}  # nothing held out yet
        assert s.scalar(sa.select(sa.func.count()).select_from(UploadedClip)) == n

    lowered = clean.settings(data_dir=tmp_path / "no-data", gate_min_test_clips=2)
    assert jobs.retrain_plan(lowered)["ready"] is True
    with_data = jobs.retrain_plan(clean.settings())  # fold 3 of the data set: 60 clips
    assert with_data["ready"] and with_data["test_set"]["n"] >= 30, with_data


def test_a_clip_of_the_test_set_is_refused_even_renamed_or_re_encoded(clean, tmp_path):
    """Issue 10, finding 4: the gate's test set (fold 3 here) never becomes training data:
    refused by content hash, and by recording for UrbanSound8K-named files; from the data set
    when it is installed, and from the served checkpoint's own spec when it is not."""
    import soundfile as sf

    test_row = cw.pick(clean.rows, 3, 1)[0]
    samples, rate = sf.read(cw.clip_path(test_row))
    other_bytes = tmp_path / test_row["slice_file_name"].replace(".flac", ".wav")
    sf.write(other_bytes, samples * 0.5, rate)  # same recording, different bytes
    for settings in (clean.settings(), clean.settings(data_dir=tmp_path / "no-data")):
        report = ingest([(f"{test_row['class']}/renamed.flac", cw.clip_path(test_row)),
                         (f"{test_row['class']}/{other_bytes.name}", other_bytes)],
                        source="cli", settings=settings)
        assert [r.code for r in report.results] == ["in_test_set", "in_test_set"], \
            [r.to_dict() for r in report.results]
        assert report.n_accepted == 0
    train_row = cw.pick(clean.rows, 2, 1, skip=70)[0]  # a training-fold clip is welcome
    assert ingest(cw.upload_items([train_row]), source="cli").n_accepted == 1
