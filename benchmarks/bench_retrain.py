"""Retraining benchmark: trigger-to-promotion time through the real path, and whether
fine-tuning on new clips helps on a fold the base model never saw.

    .venv/bin/python benchmarks/bench_retrain.py [--us8k ../shared/us8k] [--base CKPT]

What it does, all in a temporary state folder (nothing in the repository is touched):

1. Base model: trained here on UrbanSound8K fold 1 only (test fold 3, as the fixed test set of
   the quality gate), unless ``--base`` gives a checkpoint whose ``test_folds`` name the test
   fold(s). The data folder the worker sees is a tree of symlinks to folds 1 and 3 of
   ``--us8k`` (read in place, never copied).
2. Uploads: 200 real clips of fold 2, whole recordings (fsID) at a time, ingested through
   ``src.ingest`` like ``urbansound data upload``. The rest of fold 2 (other recordings) is
   the held-out set: no clip of it, nor of its recordings, is seen by either model.
3. Trigger to promotion: a real ``urbansound worker`` (Celery) is started and
   ``src.jobs.request_retrain`` is timed until the job ends (the worker picks the job up,
   decodes the new clips, evaluates the served model, fine-tunes, evaluates, publishes and
   swaps the pointer). Broker and database: the embedded default (SQLite + SQLAlchemy broker
   in the temporary state folder), or ``--broker``/``--database`` (e.g. Redis and a fresh
   Postgres database: the benchmark creates a job there).
4. Accuracy and macro-F1 of the base and of the fine-tuned model on the held-out part of
   fold 2 (in-process, same clips for both).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def link_tree(us8k: Path, dst: Path, folds: set[int]) -> Path:
    """An UrbanSound8K-layout folder holding only ``folds``, as symlinks (nothing copied)."""
    (dst / "metadata").mkdir(parents=True)
    with open(us8k / "metadata" / "UrbanSound8K.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(dst / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            src = us8k / "audio" / f"fold{r['fold']}" / r["slice_file_name"]
            if int(r["fold"]) in folds and src.is_file():
                writer.writerow(r)
                link = dst / "audio" / f"fold{r['fold']}" / r["slice_file_name"]
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(src)
    return dst


def split_fold(us8k: Path, fold: int, n_upload: int, seed: int) -> tuple[list, list]:
    """(uploads, held-out) clips of ``fold``, never splitting a recording between them."""
    from src.datasets import read_us8k

    by_group: dict[str, list] = defaultdict(list)
    for clip in read_us8k(us8k, {fold}):
        by_group[clip.group].append(clip)
    groups = sorted(by_group)
    random.Random(seed).shuffle(groups)
    uploads: list[Any] = []
    used: set[str] = set()
    for g in groups:
        if len(uploads) >= n_upload:
            break
        uploads += by_group[g]
        used.add(g)
    held_out = [c for g in groups if g not in used for c in by_group[g]]
    return uploads[:n_upload], held_out


def train_base(data: Path, epochs: int, state: Path) -> Path:
    from src.model import TrainConfig, save_checkpoint
    from src.train import train

    t0 = time.perf_counter()
    result = train(data, {3}, TrainConfig(epochs=epochs, patience=epochs, seed=0),
                   cache_dir=state / "cache", version="bench-base", progress=True)
    m = result.test_metrics
    print(f"base model: trained on fold 1 in {time.perf_counter() - t0:.0f} s "
          f"({len(result.history)} epochs); fold 3: accuracy {m['accuracy']:.3f}, "
          f"macro-F1 {m['macro_f1']:.3f}")
    return save_checkpoint(result.checkpoint, state / "bench-base.pt")


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - the worker writes to it until it is stopped
    proc = subprocess.Popen([sys.executable, "-m", "src.cli", "worker", "--hostname",
                             "bench@%h"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def worker_cpu_seconds(worker: str) -> float | None:
    """user+system CPU of the pool process named in the job row and of the decoding helpers
    it waited for (Linux /proc), read while it lives: a figure that does not depend on how busy
    the machine was. It includes the process's first-task start-up (importing torch)."""
    import re

    match = re.search(r"\(pid (\d+) on ", worker)
    if match is None:  # no pool process named
        return None
    try:
        fields = Path(f"/proc/{match[1]}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def evaluate(path: Path, clips: list, cache: Path) -> dict:
    from src.jobs import evaluate_checkpoint
    from src.model import load_checkpoint

    return evaluate_checkpoint(load_checkpoint(path), clips, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--us8k", type=Path, default=ROOT.parent / "shared" / "us8k")
    parser.add_argument("--base", type=Path, help="Base checkpoint (default: train on fold 1).")
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=None,
                        help="Fine-tuning epochs (default: URBANSOUND_RETRAIN_EPOCHS).")
    parser.add_argument("--base-clips", type=int, default=None,
                        help="Base training clips mixed in (URBANSOUND_RETRAIN_BASE_CLIPS).")
    parser.add_argument("--broker", default="", help="Celery broker URL (default: embedded).")
    parser.add_argument("--database", default="", help="Database URL (default: embedded).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    state, models = tmp / "state", tmp / "models"
    env = {**os.environ, "URBANSOUND_STATE_DIR": str(state),
           "URBANSOUND_MODELS_DIR": str(models), "URBANSOUND_BROKER_URL": args.broker,
           "URBANSOUND_RESULT_BACKEND": args.broker, "URBANSOUND_DATABASE_URL": args.database,
           "URBANSOUND_DATA_DIR": str(link_tree(args.us8k, tmp / "data", {1, 3}))}
    if args.epochs:
        env["URBANSOUND_RETRAIN_EPOCHS"] = str(args.epochs)
    if args.base_clips is not None:
        env["URBANSOUND_RETRAIN_BASE_CLIPS"] = str(args.base_clips)
    os.environ.update(env)

    from src import db, ingest, jobs, registry
    from src.settings import get_settings
    from web.celery_app import install

    get_settings.cache_clear()
    install()  # queue through Celery, as the web app and `urbansound retrain` do
    settings = get_settings()
    db.upgrade()
    base = args.base or train_base(settings.data_dir, args.base_epochs, state)
    registry.publish(base, models_dir=models)
    base_version = registry.read_metadata(base)["version"]
    registry.activate(base_version, models_dir=models)

    uploads, held_out = split_fold(args.us8k, 2, args.uploads, seed=0)
    report = ingest.ingest([(f"{c.label}/{c.path.name}", c.path) for c in uploads],
                           source="cli", client="bench", settings=settings)
    print(f"uploads: {report.n_accepted} clips of fold 2 accepted ({report.n_rejected} "
          f"rejected); held out: {len(held_out)} other clips of fold 2")

    worker = start_worker(env, tmp / "worker.log")
    try:
        t0 = time.perf_counter()
        job, _ = jobs.request_retrain("bench")
        job = jobs.wait_for_job(job["id"], poll_s=0.2, on_update=lambda j: print(
            f"  {time.perf_counter() - t0:6.1f} s  {j['status']}  {j['progress']}"))
        elapsed = time.perf_counter() - t0
        cpu_s = worker_cpu_seconds(job.get("worker") or "")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    m = job["metrics"] or {}
    print(f"\ntrigger -> {job['status']}: {elapsed:.1f} s (request_retrain until the job row "
          f"says done, through {'the broker ' + args.broker if args.broker else 'the embedded'}"
          f" broker and a real Celery worker; "
          f"{m.get('n_new')} new + {m.get('n_train_base')} base clips, "
          f"{m.get('epochs_run')} epochs, {os.cpu_count()} CPU cores, "
          f"torch threads {os.environ.get('URBANSOUND_TORCH_THREADS') or 'all'})")
    print(f"CPU time of the worker process that ran it: {cpu_s:.0f} s (wall time depends on "
          f"what else the machine runs: load average now {os.getloadavg()[0]:.1f})"
          if cpu_s is not None else "")
    print(f"job message: {job['message'] or job['error']}")
    if not job.get("result_version"):
        raise SystemExit(1)

    before = evaluate(models / f"{base_version}.pt", held_out, settings.cache_dir)
    after = evaluate(models / f"{job['result_version']}.pt", held_out, settings.cache_dir)
    print(f"\nheld-out fold 2 ({before['n']} clips of recordings neither model saw):")
    print(f"  before fine-tuning ({base_version}): accuracy {before['accuracy']:.3f}  "
          f"macro-F1 {before['macro_f1']:.3f}")
    print(f"  after  fine-tuning ({job['result_version']}): accuracy {after['accuracy']:.3f}  "
          f"macro-F1 {after['macro_f1']:.3f}")
    print(f"  change: accuracy {after['accuracy'] - before['accuracy']:+.3f}, "
          f"macro-F1 {after['macro_f1'] - before['macro_f1']:+.3f}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
