"""Load test: the same Locust profile against 1, 2 and 4 replicas behind nginx.

    .venv/bin/python benchmarks/loadtest.py [--replicas 1 2 4] [--users 12] [--duration 60]
    .venv/bin/python benchmarks/loadtest.py --docker [--replicas 1 2 4] ...

With ``--docker`` the replicas are **web containers** of the Docker Compose deployment: it is
built and started once with ``scripts/docker_e2e.sh --up`` (the images, Postgres, Redis, the
worker, Flower and the nginx container, on 127.0.0.1), each run scales the ``web`` service to N
(``--scale web=N``, same gunicorn workers and torch threads per replica as the process
topology below), waits until nginx spreads predictions over all N, and the deployment is
removed with ``scripts/docker_e2e.sh --down`` at the end, also after a failure. Server CPU is
then read from the containers' cgroups (nginx + web containers).

For each replica count it brings the local topology up with ``urbansound stack up --replicas
N`` (nginx + N gunicorn replicas + Celery worker + Flower, against the Postgres and Redis
that ``URBANSOUND_DATABASE_URL`` / ``URBANSOUND_BROKER_URL`` name, serving the model of
``URBANSOUND_MODELS_DIR``), warms every replica up, runs ``locustfile.py`` headless with the
same users and duration, and stops the stack with ``urbansound stack down``. Then it writes

* ``artifacts/loadtest/results.csv``: replicas, workers per replica, users, duration,
  requests, failures, success rate, requests/s, predictions/s, prediction latency
  p50/p95/p99 (ms), aggregated p95, and how evenly nginx spread predictions over replicas;
* ``artifacts/loadtest/results.png``: throughput and latency against the replica count, with
  the issue's floors (100 predictions/s, p95 150 ms) drawn in;
* ``artifacts/loadtest/results.md``: the markdown table (also printed) with the machine.

Everything targets 127.0.0.1 only, and every loop is bounded: Locust stops itself after
``--duration`` (and is killed 60 s later if it does not), each ``stack`` command has a
timeout, and the stack is taken down even when a run fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREDICT = "POST /api/v1/predict"
FIELDS = ["replicas", "workers_per_replica", "torch_threads", "users", "duration_s",
          "requests", "failures", "success_rate", "requests_per_s", "predictions",
          "predictions_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "all_p95_ms",
          "replica_share", "server_cpu_ms_per_request", "client_cpu_ms_per_request", "other_cores",
          "model_versions"]
TICK = os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """One line: CPU model, cores this process may use, memory, load before the run."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    try:
        mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text()
                          .splitlines() if ln.startswith("MemTotal")))
        mem = f"{mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        mem = "? RAM"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {cores} cores, {mem}, Linux {platform.release()} (load avg before: {load})"


def urbansound(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def find_clips(folder: Path, n: int) -> list[Path]:
    exts = {".wav", ".flac", ".ogg", ".mp3"}
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)[:n]


def warm_up(url: str, clips: list[Path], rounds: int) -> None:
    """A few sequential predictions so every replica's first requests (allocator, caches)
    are not part of the measurement."""
    for i in range(rounds):
        clip = clips[i % len(clips)]
        req = urllib.request.Request(f"{url}/api/v1/predict", data=clip.read_bytes(),
                                     headers={"Content-Type": "audio/flac"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()


class CpuMeter:
    """CPU seconds used while Locust runs, split three ways, so results taken on a shared
    machine can be read honestly: the serving processes (nginx + replicas: process groups, or
    containers' cgroups), the Locust client (this process's waited-for children), and
    everything else on the machine (other users' work: ``other_cores`` is how many cores it
    took on average). ``serving`` and ``idle`` return cumulative CPU seconds."""

    def __init__(self, serving: Callable[[], float], idle: Callable[[], float]):
        self.serving, self.idle = serving, idle

    @staticmethod
    def group_cpu(groups: set[int]) -> float:
        ticks = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            f = raw[raw.rfind(")") + 2:].split()
            if int(f[2]) in groups:  # utime, stime, cutime, cstime (reaped workers too)
                ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        return ticks / TICK

    @staticmethod
    def machine_busy() -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / TICK  # all but idle and iowait

    def snapshot(self) -> tuple[float, ...]:
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.monotonic(), self.serving(), self.idle(),
                children.ru_utime + children.ru_stime, self.machine_busy())

    def between(self, a: tuple[float, ...], b: tuple[float, ...]) -> dict[str, float]:
        wall, serving, idle, client, busy = (y - x for x, y in zip(a, b, strict=True))
        return {"serving_s": serving, "client_s": client,
                "other_cores": max(0.0, busy - serving - idle - client) / max(wall, 1e-9)}


def read_stats(prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def run_locust(url: str, args: argparse.Namespace, prefix: Path,
               meter: CpuMeter) -> tuple[dict, dict, dict]:
    summary = prefix.with_suffix(".summary.json")
    argv = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--host", url,
            "--headless", "-u", str(args.users), "-r", str(args.users),
            "-t", f"{args.duration}s", "--stop-timeout", "10", "--only-summary",
            "--csv", str(prefix), "--clips", str(args.clips), "--think-ms", args.think_ms,
            "--summary-out", str(summary), "--loglevel", "WARNING"]
    before = meter.snapshot()
    out = subprocess.run(argv, cwd=ROOT, text=True, capture_output=True,
                         timeout=args.duration + 90)
    cpu = meter.between(before, meter.snapshot())
    (prefix.parent / f"{prefix.name}.locust.log").write_text(out.stdout + out.stderr)
    if not Path(f"{prefix}_stats.csv").is_file():
        raise RuntimeError(f"locust wrote no statistics (exit {out.returncode}): "
                           f"{(out.stderr or out.stdout)[-500:]}")
    seen = json.loads(summary.read_text()) if summary.is_file() else {}
    return read_stats(prefix), seen, cpu


def row_for(n: int, workers: int, threads: int, args: argparse.Namespace,
            stats: dict[str, dict[str, str]], seen: dict[str, Any],
            cpu: dict[str, float]) -> dict[str, Any]:
    agg, pred = stats["Aggregated"], stats.get(PREDICT, {})
    requests, failures = int(agg["Request Count"]), int(agg["Failure Count"])
    shares = sorted((seen.get("upstreams") or {}).values(), reverse=True)
    total = sum(shares) or 1
    return {
        "replicas": n, "workers_per_replica": workers, "torch_threads": threads,
        "users": args.users, "duration_s": args.duration,
        "requests": requests, "failures": failures,
        "success_rate": round(100.0 * (requests - failures) / max(1, requests), 3),
        "requests_per_s": round(float(agg["Requests/s"]), 1),
        "predictions": int(pred.get("Request Count", 0)),
        "predictions_per_s": round(float(pred.get("Requests/s", 0.0)), 1),
        "mean_ms": round(float(pred.get("Average Response Time", "nan")), 1),
        "p50_ms": float(pred.get("50%", "nan")), "p95_ms": float(pred.get("95%", "nan")),
        "p99_ms": float(pred.get("99%", "nan")), "all_p95_ms": float(agg["95%"]),
        "replica_share": "/".join(f"{100 * s / total:.0f}" for s in shares),
        "server_cpu_ms_per_request": round(1000 * cpu["serving_s"] / max(1, requests), 2),
        "client_cpu_ms_per_request": round(1000 * cpu["client_s"] / max(1, requests), 2),
        "other_cores": round(cpu["other_cores"], 2),
        "model_versions": ";".join(sorted(seen.get("versions") or {})),
    }


def stack_meter() -> CpuMeter:
    from src.stack import load_state

    state = load_state()
    if state is None:
        raise RuntimeError("stack up left no state file")
    serving = {p.pid for p in state.processes if p.name == "nginx" or p.name.startswith("web-")}
    idle = {p.pid for p in state.processes} - serving
    return CpuMeter(lambda: CpuMeter.group_cpu(serving), lambda: CpuMeter.group_cpu(idle))


def container_cpu(container_id: str) -> float:
    """Cumulative CPU seconds of one container, from its cgroup (v1 cpuacct, or v2)."""
    cg = Path("/sys/fs/cgroup")
    v1 = cg / "cpuacct" / "docker" / container_id / "cpuacct.usage"
    if v1.is_file():
        return int(v1.read_text()) / 1e9
    for v2 in (cg / "docker" / container_id / "cpu.stat",
               cg / "system.slice" / f"docker-{container_id}.scope" / "cpu.stat"):
        if v2.is_file():
            for line in v2.read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
    raise RuntimeError(f"no CPU accounting found for container {container_id[:12]}")


class DockerDeployment:
    """The Compose deployment ``scripts/docker_e2e.sh --up`` started (its settings are in the
    state folder's ``docker/current.env``): scale the web service, meter its containers."""

    def __init__(self, state: Path):
        values = {}
        for line in (state / "docker" / "current.env").read_text().splitlines():
            key, _, value = line.partition("=")
            values[key] = shlex.split(value)[0] if value else ""
        self.project, self.run_dir = values["PROJECT"], Path(values["RUN_DIR"])
        self.command = values["COMPOSE_CMD"].split()

    def compose(self, *args: str, env: dict[str, str] | None = None) -> None:
        env_file = str(self.run_dir / "e2e.env")
        out = subprocess.run([*self.command, "-p", self.project, "--env-file", env_file,
                              "-f", str(ROOT / "docker-compose.yml"), *args], cwd=ROOT,
                             env={**os.environ, "URBANSOUND_ENV_FILE": env_file, **(env or {})},
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}: {out.stderr.strip()[-800:]}")

    def containers(self, service: str | None = None) -> list[str]:
        labels = [f"label=com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"label=com.docker.compose.service={service}")
        out = subprocess.run(["docker", "ps", "-q", "--no-trunc",
                              *[a for label in labels for a in ("--filter", label)]],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.split()

    def healthy(self, ids: list[str]) -> bool:
        out = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", *ids],
                             capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and set(out.stdout.split()) == {"healthy"}

    def scale(self, n: int, workers: int, threads: int, url: str, clip: Path) -> None:
        """N web containers, each with ``workers`` gunicorn workers of ``threads`` torch
        threads (changed settings recreate the containers), all healthy, and nginx spreading
        predictions over all N (it re-resolves the service name within seconds)."""
        self.compose("up", "-d", "--no-build", "--scale", f"web={n}", env={
            "URBANSOUND_WEB_WORKERS": str(workers), "WEB_TORCH_THREADS": str(threads),
            "WEB_CPUS": str(len(os.sched_getaffinity(0)))})
        deadline = time.monotonic() + 300
        while True:
            ids = self.containers("web")
            if len(ids) == n and self.healthy(ids):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids)} web containers, not {n} healthy, after 300 s")
            time.sleep(2)
        seen: set[str] = set()
        while len(seen) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx reached {len(seen)} of {n} web containers")
            req = urllib.request.Request(f"{url}/api/v1/predict", data=clip.read_bytes(),
                                         headers={"Content-Type": "audio/flac"}, method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                seen.add(r.headers.get("X-Upstream", "?"))

    def meter(self) -> CpuMeter:
        serving = self.containers("web") + self.containers("nginx")
        idle = sorted(set(self.containers()) - set(serving))
        return CpuMeter(lambda: sum(map(container_cpu, serving)),
                        lambda: sum(map(container_cpu, idle)))


def one_run(n: int, args: argparse.Namespace, out: Path,
            docker: DockerDeployment | None = None) -> dict[str, Any]:
    from src.cpu import torch_threads, workers_per_replica

    workers = args.workers or workers_per_replica(n)
    threads = int(os.environ.get("URBANSOUND_TORCH_THREADS") or torch_threads(n, workers))
    url = f"http://127.0.0.1:{args.port}"
    clips = find_clips(args.clips, 20)
    if docker is not None:
        print(f"== {n} web container(s): compose up --scale web={n} ...", flush=True)
        docker.scale(n, workers, threads, url, clips[0])
        meter_for: Callable[[], CpuMeter] = docker.meter
        stop: Callable[[], None] = lambda: None  # noqa: E731 (the deployment outlives a run)
    else:
        up_args = ["stack", "up", "--replicas", str(n), "--port", str(args.port),
                   "--flower-port", str(args.flower_port), "--timeout", "300"]
        if args.workers:
            up_args += ["--workers", str(args.workers)]
        if args.threads:
            up_args += ["--threads", str(args.threads)]
        print(f"== {n} replica(s): stack up ...", flush=True)
        started = urbansound(*up_args, timeout=420)
        if started.returncode != 0:
            raise RuntimeError(f"stack up --replicas {n} failed: {started.stderr.strip()}")
        meter_for, stop = stack_meter, stack_down
    try:
        warm_up(url, clips, rounds=10 * n)
        time.sleep(2)
        print(f"   locust: {args.users} users, {args.duration} s ...", flush=True)
        stats, seen, cpu = run_locust(url, args, out / f"locust_{n}", meter_for())
    finally:
        stop()
    row = row_for(n, workers, threads, args, stats, seen, cpu)
    print(f"   {row['predictions_per_s']} predictions/s, p95 {row['p95_ms']:.0f} ms, "
          f"success {row['success_rate']}%, server CPU {row['server_cpu_ms_per_request']} "
          f"ms/request, others used {row['other_cores']} cores", flush=True)
    return row


def stack_down() -> None:
    stopped = urbansound("stack", "down", timeout=120)
    if stopped.returncode != 0:
        print(f"warning: stack down: {stopped.stderr.strip()}", file=sys.stderr)


def e2e_script(*args: str, port: int) -> None:
    """``scripts/docker_e2e.sh --up|--down`` (its output passes through: it says what it
    built and checked)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "docker_e2e.sh"), *args], cwd=ROOT,
                         env={**os.environ, "E2E_HTTP_PORT": str(port)}, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/docker_e2e.sh {' '.join(args)} failed ({out.returncode})")


def markdown(rows: list[dict[str, Any]], description: str, args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {description}. Locust ({args.users} users, closed loop, think time "
        f"{args.think_ms} ms, {args.duration} s per run) runs on the same machine. Latency "
        "is for predictions, through nginx, as the client sees it. Server CPU = CPU time of "
        "nginx and the replicas per request (all endpoints); 'cores used by others' = the "
        "machine's busy time not spent by this test (other users of a shared machine)."
        + (" Topology: Docker Compose (docker-compose.yml), N `web` containers behind the "
           "nginx container, Postgres, Redis, the Celery worker and Flower as containers; "
           "server CPU read from the containers' cgroups." if args.docker else ""),
        "",
        f"| {'web containers' if args.docker else 'replicas'} | workers x torch threads "
        "| req/s (all) | predictions/s | predict mean ms | p50 ms "
        "| p95 ms | p99 ms | success | spread over replicas (%) | server CPU ms/req "
        "| cores used by others |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|:---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['replicas']} | {r['workers_per_replica']} x {r['torch_threads']} | "
            f"{r['requests_per_s']:.1f} | {r['predictions_per_s']:.1f} | {r['mean_ms']:.0f} | "
            f"{r['p50_ms']:.0f} | "
            f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['success_rate']:.2f}% | "
            f"{r['replica_share']} | {r['server_cpu_ms_per_request']:.1f} | "
            f"{r['other_cores']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["replicas"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    labels = [str(x) for x in n]
    a.bar(labels, [r["predictions_per_s"] for r in rows], color="#2b6cb0",
          label="predictions/s")
    a.plot(labels, [r["requests_per_s"] for r in rows], "o-", color="#444",
           label="all requests/s")
    for x, r in zip(labels, rows, strict=True):
        a.annotate(f"{r['server_cpu_ms_per_request']:.1f} ms CPU/req\nothers: "
                   f"{r['other_cores']:.2f} cores", (x, r["predictions_per_s"] / 2),
                   ha="center", fontsize=7, color="white")
    a.axhline(100, ls="--", color="#c53030", lw=1, label="floor: 100 predictions/s")
    a.set_xlabel("replicas")
    a.set_ylabel("per second")
    a.set_title("Throughput")
    a.legend(fontsize=8)
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        b.plot(labels, [r[key] for r in rows], style, label=key.replace("_ms", ""))
    b.axhline(150, ls="--", color="#c53030", lw=1, label="floor: p95 150 ms")
    b.set_xlabel("replicas")
    b.set_ylabel("prediction latency, ms")
    b.set_title("Latency through nginx")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--users", type=int, default=12, help="Concurrent Locust clients.")
    p.add_argument("--duration", type=int, default=60, help="Seconds of load per run.")
    p.add_argument("--think-ms", default="0", help="Pause between a client's requests.")
    p.add_argument("--clips", type=Path, default=ROOT.parent / "shared" / "us8k")
    p.add_argument("--port", type=int, default=18080, help="nginx port (127.0.0.1).")
    p.add_argument("--flower-port", type=int, default=18555)
    p.add_argument("--workers", type=int, default=0, help="gunicorn workers per replica "
                   "(0: cores / replicas).")
    p.add_argument("--threads", type=int, default=0, help="gthread threads per worker.")
    p.add_argument("--out", type=Path, default=None, help="Results folder (default: "
                   "artifacts/loadtest, or artifacts/loadtest-docker with --docker).")
    p.add_argument("--docker", action="store_true", help="Web containers of the Docker "
                   "Compose deployment instead of `urbansound stack` processes.")
    p.add_argument("--check-floors", action="store_true", help="Exit 1 unless the 2-replica "
                   "run reaches the issue's floors (>= 100 predictions/s, p95 <= 150 ms, "
                   "100%% success).")
    args = p.parse_args(argv)
    if not 1 <= args.duration <= 600 or not 1 <= args.users <= 200:
        p.error("--duration must be 1-600 s and --users 1-200 (bounded load only)")
    if not find_clips(args.clips, 1):
        p.error(f"no audio clips under {args.clips}")
    args.out = args.out or ROOT / "artifacts" / ("loadtest-docker" if args.docker else "loadtest")
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    description = machine()
    if args.docker:
        e2e_script("--up", port=args.port)
        try:  # the state folder as the script resolves it (relative to the repository)
            docker = DockerDeployment(ROOT / os.environ.get("URBANSOUND_STATE_DIR", "var"))
            rows = [one_run(n, args, args.out, docker) for n in args.replicas]
        finally:
            e2e_script("--down", port=args.port)
    else:
        rows = [one_run(n, args, args.out) for n in args.replicas]

    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, description, args)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "results.png", description)
    print()
    print(table)
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.png'}")
    if args.check_floors:
        misses = [f"{r['replicas']} replicas: {r['predictions_per_s']} predictions/s, p95 "
                  f"{r['p95_ms']:.0f} ms, {r['success_rate']}% success"
                  for r in rows if r["replicas"] == 2 and not (
                      r["predictions_per_s"] >= 100 and r["p95_ms"] <= 150
                      and r["failures"] == 0)]
        if misses or not any(r["replicas"] == 2 for r in rows):
            print(f"floors missed: {'; '.join(misses) or 'no 2-replica run'}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
