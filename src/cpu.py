"""How many cores this process may use, and how to share them: gunicorn workers per server and
torch threads per process. The one CPU policy of the project; ``deploy/gunicorn.conf.py``,
``urbansound stack``, training and the web app all ask here.

The rule is *processes x torch threads = cores*. torch's default (every core in every process)
oversubscribes the CPU as soon as two processes run the model: each forward pass then fights
the others for the same cores and p95 latency doubles.

Cores are counted from what this process may really run on: ``URBANSOUND_CPU_CORES`` when the
operator says (a replica's share of a machine), else the CPU affinity mask (``taskset``,
cpusets; ``os.cpu_count`` ignores both) capped by a cgroup CPU quota (a container's
``--cpus``). Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .settings import Settings, get_settings

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(settings: Settings | None = None) -> int:
    """Cores this process may use (at least one): ``settings.cpu_cores`` when set, else the
    CPU affinity mask, capped by a cgroup CPU quota when there is one."""
    explicit = (settings or get_settings()).cpu_cores
    if explicit > 0:
        return explicit
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def cgroup_quota(root: Path = CGROUP_ROOT) -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), or None when there
    is none. cgroup v2 (``cpu.max`` on the process's group and its parents) and v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` as a container sees them)."""
    limits: list[float] = []
    try:
        own = next((line[3:].strip() for line in Path("/proc/self/cgroup").read_text()
                    .splitlines() if line.startswith("0::")), None)
    except OSError:
        own = None
    if own is not None:  # v2: the tightest limit on the way up to the root
        group = root / own.lstrip("/")
        for path in (group, *group.parents):
            quota, _, period = _read(path / "cpu.max").partition(" ")
            if quota.isdigit() and period.strip().isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
            if path == root:
                break
    quota_us, period_us = _read(root / "cpu" / "cpu.cfs_quota_us"), \
        _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_us.isdigit() and period_us.isdigit() and int(period_us) > 0:  # v1; -1 = none
        limits.append(int(quota_us) / int(period_us))
    return max(1, math.ceil(min(limits))) if limits else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def workers_per_replica(replicas: int = 1, cores: int | None = None) -> int:
    """gunicorn workers for each of ``replicas`` servers sharing the cores (at least one)."""
    return max(1, (cores or usable_cores()) // max(1, replicas))


def torch_threads(replicas: int = 1, workers: int = 1, cores: int | None = None,
                  settings: Settings | None = None) -> int:
    """Intra-op threads per process so that replicas x workers x threads = cores (at least
    one). With ``settings``, the operator's ``torch_threads`` wins when set."""
    if settings is not None and settings.torch_threads > 0:
        return settings.torch_threads
    return max(1, (cores or usable_cores(settings)) // max(1, replicas * workers))
