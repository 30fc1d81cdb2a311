"""``urbansound up``: the embedded default really starts (SQLite migrated, gunicorn and a
Celery worker as children) and SIGTERM stops both children cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from web_helpers import ROOT, TOKEN, build_registry, free_port

pytestmark = pytest.mark.integration


def children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc), to prove none is left behind."""
    found, frontier = set(), {pid}
    while frontier:
        nxt = set()
        for proc in os.listdir("/proc"):
            if not proc.isdigit():
                continue
            try:
                with open(f"/proc/{proc}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in frontier:
                nxt.add(int(proc))
        found |= nxt
        frontier = nxt
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_up_runs_web_and_worker_and_stops_both(quick_model, synthetic_data, tmp_path):
    models = build_registry(quick_model.checkpoint, tmp_path)
    port = free_port()
    env = {**os.environ, "URBANSOUND_STATE_DIR": str(tmp_path / "var"),
           "URBANSOUND_MODELS_DIR": str(models), "URBANSOUND_DATA_DIR": str(synthetic_data),
           "URBANSOUND_DATABASE_URL": "", "URBANSOUND_BROKER_URL": "",
           "URBANSOUND_RESULT_BACKEND": "", "URBANSOUND_API_TOKEN": TOKEN,
           "URBANSOUND_ACCESS_LOG": "", "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "src.cli", "up", "--port", str(port),
                                 "--workers", "1"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = requests.get(f"http://127.0.0.1:{port}/api/v1/ready", timeout=5)
                if ready.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert ready is not None and ready.status_code == 200, log.read_text()[-3000:]
        assert (tmp_path / "var" / "urbansound.db").is_file()  # migrated SQLite
        text = log.read_text()
        assert "urbansound is up" in text and "worker pid" in text
        worker_deadline = time.monotonic() + 180
        while " ready." not in log.read_text() and time.monotonic() < worker_deadline:
            time.sleep(1)
        assert " ready." in log.read_text(), "the Celery worker did not start"
        descendants = children(proc.pid)
        assert len(descendants) >= 3  # gunicorn master + worker, celery (+ pool)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
    assert "stopped." in log.read_text()
    time.sleep(1)
    assert not [p for p in descendants if alive(p)], "children left running"
