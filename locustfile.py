"""Locust load profile for the urbansound API: what production traffic looks like.

    .venv/bin/locust -f locustfile.py --host http://127.0.0.1:8080 --headless -u 16 -r 16 -t 60s

The mix, per simulated client (weights):

* 16  ``POST /api/v1/predict`` with a real clip as the raw body (``audio/flac``), as a program
  calls it;
*  4  the same as a multipart form (``file`` field), as the browser page sends it;
*  3  ``GET /api/v1/health`` (load balancers, uptime checks);
*  1  ``GET /api/v1/metrics`` (the dashboard's JSON) and 1 ``GET /metrics`` (a Prometheus scrape);
*  1  ``GET /api/v1/jobs`` (someone polling retraining jobs), then the newest job by id.

Clips are real UrbanSound8K recordings from ``../shared/us8k`` (or ``--clips DIR`` /
``URBANSOUND_LOCUST_CLIPS``), read once into memory at start (at most ``--max-clips``, a
seeded sample, so every run sends the same clips) so the client spends no time on disk.
Requests are named by endpoint so the statistics group by route: both kinds of prediction are
``POST /api/v1/predict``, a job lookup is ``GET /api/v1/jobs/[id]``.

A prediction counts as failed unless it is a 200 with a label, probabilities and a model
version. The model versions and replicas (nginx's ``X-Upstream`` header) that answered are
counted and, with ``--summary-out FILE`` (``URBANSOUND_LOCUST_SUMMARY``), written as JSON when
the run ends; the load-test command reports them.

Think time between a client's requests: ``--think-ms MIN,MAX`` (default 0: a closed loop,
each client sends its next request as soon as the previous one is answered, which measures
capacity; use e.g. 200,1000 to model people).
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import uuid
from collections import Counter
from pathlib import Path

from locust import FastHttpUser, between, constant, events, task

HERE = Path(__file__).resolve().parent
DEFAULT_CLIPS = HERE.parent / "shared" / "us8k"
AUDIO = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
US8K_NAME = re.compile(r"^\d+-(\d+)-\d+-\d+\.\w+$")


class Clip:
    """One clip, ready to send both ways (bytes are built once, not per request)."""

    def __init__(self, path: Path):
        self.name = path.name
        self.data = path.read_bytes()
        self.content_type = AUDIO[path.suffix.lower()]
        m = US8K_NAME.match(path.name)
        self.class_id = int(m.group(1)) if m else None
        boundary = f"----urbansound{uuid.uuid4().hex}"
        self.multipart_type = f"multipart/form-data; boundary={boundary}"
        self.multipart = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{self.name}\"\r\nContent-Type: {self.content_type}\r\n\r\n"
        ).encode() + self.data + f"\r\n--{boundary}--\r\n".encode()


CLIPS: list[Clip] = []
SEEN = {"versions": Counter(), "upstreams": Counter(), "labels": Counter()}
_seen_lock = threading.Lock()


def find_clips(root: Path, limit: int, seed: int = 0) -> list[Path]:
    """Audio files under ``root`` (sorted, then a seeded sample of ``limit``)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO and p.is_file())
    if limit and len(files) > limit:
        files = sorted(random.Random(seed).sample(files, limit))
    return files


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    parser.add_argument("--clips", type=str, env_var="URBANSOUND_LOCUST_CLIPS",
                        default=str(DEFAULT_CLIPS), help="Folder of audio clips to predict.")
    parser.add_argument("--max-clips", type=int, env_var="URBANSOUND_LOCUST_MAX_CLIPS",
                        default=200, help="At most this many clips are loaded (seeded sample).")
    parser.add_argument("--think-ms", type=str, env_var="URBANSOUND_LOCUST_THINK_MS",
                        default="0", help="Pause between a client's requests: MS or MIN,MAX.")
    parser.add_argument("--summary-out", type=str, env_var="URBANSOUND_LOCUST_SUMMARY",
                        default="", help="Write versions/replicas seen as JSON here at the end.")


@events.init.add_listener
def load_clips(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:  # used as a library without options: defaults
        root, limit = Path(os.environ.get("URBANSOUND_LOCUST_CLIPS", DEFAULT_CLIPS)), 200
    else:
        root, limit = Path(options.clips), options.max_clips
    paths = find_clips(root, limit) if root.is_dir() else []
    if not paths:
        raise SystemExit(f"locustfile: no audio clips under {root} (set --clips DIR or "
                         "URBANSOUND_LOCUST_CLIPS)")
    CLIPS[:] = [Clip(p) for p in paths]


@events.quitting.add_listener
def write_summary(environment, **_kwargs) -> None:
    options = environment.parsed_options
    out = getattr(options, "summary_out", "") if options is not None else ""
    if not out:
        return
    with _seen_lock:
        data = {k: dict(v) for k, v in SEEN.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=2, sort_keys=True))


def think_time(user: FastHttpUser) -> float:
    """Per-request pause from ``--think-ms`` (parsed once per user)."""
    if user._think is None:
        options = user.environment.parsed_options
        spec = getattr(options, "think_ms", "0") if options is not None else "0"
        parts = [float(x) / 1000 for x in str(spec).split(",") if x.strip()]
        user._think = between(parts[0], parts[1]) if len(parts) == 2 else constant(parts[0])
    return user._think(user)


class ApiClient(FastHttpUser):
    """A program (and now and then a person) using the REST API through nginx."""

    wait_time = think_time
    _think = None

    def on_start(self) -> None:
        self.rng = random.Random()

    def _predict(self, body: bytes, content_type: str, name: str) -> None:
        with self.client.post("/api/v1/predict", data=body, name=name,
                              headers={"Content-Type": content_type},
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                out = r.json()
                version, label = out["model_version"], out["label"]
                assert isinstance(out["probabilities"], dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                r.failure(f"not a prediction: {(r.text or '')[:200]}")
                return
            with _seen_lock:
                SEEN["versions"][version] += 1
                SEEN["labels"][label] += 1
                SEEN["upstreams"][r.headers.get("X-Upstream") or "?"] += 1

    @task(16)
    def predict_raw(self) -> None:
        clip = self.rng.choice(CLIPS)
        self._predict(clip.data, clip.content_type, "POST /api/v1/predict")

    @task(4)
    def predict_form(self) -> None:
        clip = self.rng.choice(CLIPS)
        self._predict(clip.multipart, clip.multipart_type, "POST /api/v1/predict")

    @task(3)
    def health(self) -> None:
        self.client.get("/api/v1/health", name="GET /api/v1/health")

    @task(1)
    def metrics_json(self) -> None:
        self.client.get("/api/v1/metrics", name="GET /api/v1/metrics")

    @task(1)
    def prometheus(self) -> None:
        self.client.get("/metrics", name="GET /metrics")

    @task(1)
    def poll_jobs(self) -> None:
        with self.client.get("/api/v1/jobs?limit=5", name="GET /api/v1/jobs",
                             catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return
            items = (r.json() or {}).get("items") or []
        if items:
            self.client.get(f"/api/v1/jobs/{items[0]['id']}", name="GET /api/v1/jobs/[id]")
