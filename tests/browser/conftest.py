"""The whole system for browser tests: Postgres, Redis, the web app under real gunicorn, a real
Celery worker, and headless Debian Chromium driven by Selenium.

Data are real UrbanSound8K clips from ``../shared/us8k``, read in place (the data folder is a
small UrbanSound8K-layout tree of symlinks under tmp): base training = folds 4-9 plus 4 clips
per class of fold 1, fixed test set = 3 clips per class of fold 3; uploads come from fold 2.
The base model trains for a few epochs and a retrain runs one epoch, so the test stays short.

When Chromium, chromedriver, Postgres, Redis or the clips are missing, the tests fail in CI
(``CI`` set) and are skipped elsewhere, saying what is missing. Screenshots are saved under
``artifacts/screenshots/`` (gitignored) as test artefacts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from web_helpers import (
    PASSWORD,
    TOKEN,
    Gunicorn,
    build_us8k,
    pg_admin_engine,
    pick,
    unavailable,
    us8k_rows,
)

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path(os.environ.get("URBANSOUND_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("URBANSOUND_CHROMEDRIVER", "/usr/bin/chromedriver"))
REDIS_DB = int(os.environ.get("URBANSOUND_TEST_BROWSER_REDIS_DB", "11"))
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run",
                # a fake microphone (a beep), granted without a prompt: the recording test
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream")

pytestmark = pytest.mark.browser


# --------------------------------------------------------------------------- requirements

def require_tools() -> None:
    for path, what in ((CHROMIUM, "Debian chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            unavailable(f"{what} not found at {path} (apt-get install chromium chromium-driver)")


def require_services():
    import redis

    engine = pg_admin_engine()
    try:
        redis.Redis("127.0.0.1", 6379, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis not reachable at 127.0.0.1:6379 ({exc})")
    return engine


# --------------------------------------------------------------------------- the system

@dataclass
class System:
    root: Path
    env: dict[str, str]
    rows: list[dict[str, str]]
    web: Gunicorn
    worker_log: Path

    @property
    def url(self) -> str:
        return self.web.url

    def api(self, method: str, path: str, **kwargs):
        import requests

        headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=60,
                                **kwargs)


def train_base(env: dict[str, str], root: Path) -> None:
    from src import registry
    from src.model import TrainConfig, save_checkpoint
    from src.train import set_threads, train

    set_threads(2)
    result = train(Path(env["URBANSOUND_DATA_DIR"]), {3}, TrainConfig(epochs=5, patience=5),
                   cache_dir=Path(env["URBANSOUND_STATE_DIR"]) / "cache", version="base-1",
                   progress=False)
    ckpt = dict(result.checkpoint, torch=str(result.checkpoint["torch"]))
    tmp = save_checkpoint(ckpt, root / "base-1.pt")
    models = Path(env["URBANSOUND_MODELS_DIR"])
    registry.publish(tmp, "base-1", models_dir=models)
    registry.activate("base-1", models_dir=models)


def start_worker(env: dict[str, str], log: Path, timeout: float = 300) -> subprocess.Popen:
    node = f"browser-{secrets.token_hex(3)}@{socket.gethostname()}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "src.cli", "worker", "--hostname", node],
                                cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited ({proc.returncode}):\n{text[-3000:]}")
        if " ready." in text:
            return proc
        time.sleep(0.5)
    raise RuntimeError(f"worker not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen | None) -> None:
    import signal

    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def system(tmp_path_factory) -> Iterator[System]:
    require_tools()
    admin = require_services()
    rows = us8k_rows()
    import redis

    from src import db
    from src.settings import get_settings

    root = tmp_path_factory.mktemp("browser")
    name = f"urbansound_browser_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db_url = admin.url.set(database=name).render_as_string(hide_password=False)
    redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    redis.Redis("127.0.0.1", 6379, db=REDIS_DB).flushdb()
    data = build_us8k(root / "data", [r for r in rows if int(r["fold"]) >= 4]
                      + pick(rows, 1, 4) + pick(rows, 3, 3))
    env = {
        "URBANSOUND_STATE_DIR": str(root / "state"), "URBANSOUND_DATA_DIR": str(data),
        "URBANSOUND_MODELS_DIR": str(root / "models"), "URBANSOUND_DATABASE_URL": db_url,
        "URBANSOUND_BROKER_URL": redis_url, "URBANSOUND_RESULT_BACKEND": redis_url,
        "URBANSOUND_API_TOKEN": TOKEN, "URBANSOUND_ADMIN_PASSWORD": PASSWORD,
        "URBANSOUND_SECRET_KEY": secrets.token_hex(16),
        "URBANSOUND_RETRAIN_EPOCHS": "1", "URBANSOUND_RETRAIN_BASE_CLIPS": "60",
        "URBANSOUND_TORCH_THREADS": "1", "URBANSOUND_JOB_HEARTBEAT_S": "2",
        "URBANSOUND_ACCESS_LOG": "",
    }
    saved = dict(os.environ)
    os.environ.update(env)
    get_settings.cache_clear()
    worker = None
    web = Gunicorn(env, root / "gunicorn.log", workers=2)
    try:
        db.upgrade(db_url)
        train_base(env, root)
        worker = start_worker(env, root / "worker.log")
        web.start()
        web.wait_workers("base-1")
        yield System(root, env, rows, web, root / "worker.log")
    finally:
        web.stop()
        stop(worker)
        for log in (root / "gunicorn.log", root / "worker.log"):
            if log.exists():
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, SCREENSHOTS / f"browser-{log.name}")
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        db.dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def browser(system) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def screenshot(browser, request):
    """``screenshot(name)`` saves the page as ``artifacts/screenshots/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(max(int(height), 800), 4000))
        browser.save_screenshot(str(path))
        browser.set_window_size(1280, 1000)
        return path

    return save
