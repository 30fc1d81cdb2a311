"""The HTTP checks of scripts/docker_e2e.sh, against the deployment through nginx.

Standard library only (it runs with any host Python 3.11, no virtualenv needed), one
subcommand per step; each prints one line saying what it checked and exits non-zero with the
reason when the check fails:

    e2e_checks.py predict URL CLIP                 a real clip -> 200, label, model version
    e2e_checks.py upload URL TOKEN CLIPS N         a zip of N labelled clips (class folders)
    e2e_checks.py retrain URL TOKEN TIMEOUT_S      queue a retrain, poll it to a final state
    e2e_checks.py wait URL TIMEOUT_S               until nginx answers /api/v1/ready
    e2e_checks.py predict-loop URL CLIP FILE       predict until FILE exists; fail on any error

Labels of UrbanSound8K clips come from their file names ({fsID}-{classID}-...), the class
names from the data set's metadata CSV beside the audio.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

AUDIO = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}


def call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, dict(e.headers), json.loads(body or b"{}")
        except ValueError:
            return e.code, dict(e.headers), {"raw": body[:300].decode("latin-1")}


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def predict_once(url: str, clip: Path) -> tuple[dict, dict]:
    status, headers, out = call(f"{url}/api/v1/predict", clip.read_bytes(),
                                {"Content-Type": AUDIO[clip.suffix.lower()]}, "POST")
    if status != 200 or not {"label", "probabilities", "model_version"} <= out.keys():
        fail(f"predict {clip.name}: HTTP {status}: {str(out)[:300]}")
    return out, headers


def predict(url: str, clip: str) -> None:
    out, headers = predict_once(url, Path(clip))
    print(f"ok: predict {Path(clip).name} through nginx -> {out['label']} "
          f"({out['confidence']:.2f}), model {out['model_version']}, "
          f"replica {headers.get('X-Upstream', '?')}")


def class_names(clips: Path) -> dict[int, str]:
    for meta in sorted(clips.rglob("*.csv")):
        with open(meta, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and {"classID", "class"} <= rows[0].keys():
            return {int(r["classID"]): r["class"] for r in rows}
    fail(f"no UrbanSound8K metadata CSV under {clips}")
    return {}


def upload(url: str, token: str, clips_dir: str, n: str) -> None:
    root = Path(clips_dir)
    names = class_names(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO)
    by_class: dict[int, list[Path]] = {}
    for p in files:
        by_class.setdefault(int(p.name.split("-")[1]), []).append(p)
    chosen: list[Path] = []
    while len(chosen) < int(n) and any(by_class.values()):  # round-robin over the classes
        for cid in sorted(by_class):
            if by_class[cid] and len(chosen) < int(n):
                chosen.append(by_class[cid].pop(len(by_class[cid]) // 2))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in chosen:
            z.write(p, f"{names[int(p.name.split('-')[1])]}/{p.name}")
    status, _, out = call(f"{url}/api/v1/uploads", buf.getvalue(),
                          {"Content-Type": "application/zip",
                           "Authorization": f"Bearer {token}"}, "POST", timeout=300)
    if status != 201 or not out.get("n_accepted"):
        fail(f"upload: HTTP {status}: {str(out)[:400]}")
    print(f"ok: upload of a zip of {len(chosen)} clips ({len(names)} classes) -> upload "
          f"{out['upload_id']}: {out['n_accepted']} accepted, {out['n_rejected']} rejected")


def retrain(url: str, token: str, timeout_s: str) -> None:
    status, _, out = call(f"{url}/api/v1/retrain", b"{}",
                          {"Content-Type": "application/json",
                           "Authorization": f"Bearer {token}"}, "POST")
    if status not in (200, 202):
        fail(f"retrain: HTTP {status}: {str(out)[:400]}")
    job = out["job"]
    deadline = time.monotonic() + float(timeout_s)
    last = None
    while not job.get("done"):
        if time.monotonic() > deadline:
            fail(f"retrain job {job['id']} not done after {timeout_s} s: {job['status']} "
                 f"{job.get('progress')}")
        time.sleep(3)
        status, _, job = call(f"{url}/api/v1/jobs/{job['id']}")
        if status != 200:
            fail(f"job {out['job']['id']}: HTTP {status}: {str(job)[:300]}")
        if job.get("progress") != last:
            last = job.get("progress")
            print(f"   job {job['id']}: {job['status']} {json.dumps(last)[:160]}", flush=True)
    if job["status"] != "succeeded" or not job.get("result_version"):
        fail(f"retrain job {job['id']} ended {job['status']}: {job.get('message')} "
             f"{job.get('error') or ''}")
    print(f"ok: retrain job {job['id']} {job['status']} in {job.get('duration_s')} s: "
          f"{job.get('message')}")
    print(f"PROMOTED={job['result_version']}")


def wait(url: str, timeout_s: str) -> None:
    deadline = time.monotonic() + float(timeout_s)
    while True:
        try:
            status, _, out = call(f"{url}/api/v1/ready", timeout=5)
        except (OSError, ValueError) as e:
            status, out = 0, {"error": str(e)}
        if status == 200:
            print(f"ok: ready through nginx ({', '.join(out.get('checks', {}))})")
            return
        if time.monotonic() > deadline:
            fail(f"not ready through nginx after {timeout_s} s: HTTP {status} {str(out)[:300]}")
        time.sleep(2)


def predict_loop(url: str, clip: str, stop_file: str) -> None:
    """Predictions back to back until ``stop_file`` appears: any error fails (a rolling
    update must not lose one). Prints how many, and which versions/replicas answered."""
    n, versions, replicas = 0, set(), set()
    while not Path(stop_file).exists():
        out, headers = predict_once(url, Path(clip))
        n += 1
        versions.add(out["model_version"])
        replicas.add(headers.get("X-Upstream", "?"))
    print(f"ok: {n} predictions during the update, 0 failed; {len(replicas)} replica "
          f"addresses answered")


if __name__ == "__main__":
    commands: dict[str, Callable[..., None]] = {
        "predict": predict, "upload": upload, "retrain": retrain, "wait": wait,
        "predict-loop": predict_loop}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        fail(f"usage: {__doc__}")
    commands[sys.argv[1]](*sys.argv[2:])
