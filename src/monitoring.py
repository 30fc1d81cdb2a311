"""Production metrics: what the served model sees and how fast it answers.

prometheus_client in *multiprocess mode*: each gunicorn worker writes its counters and
histograms to small mmap files in one folder and whichever worker answers ``/metrics`` merges
all of them, so a scrape through any worker reports the whole server (a per-process registry
would report one random worker's share). The JSON summary (``/api/v1/metrics``) is computed
from exactly the same merged samples, so the two views can never disagree.

The folder is ``PROMETHEUS_MULTIPROC_DIR`` when set (one per server: the gunicorn master wipes
it on start, see ``deploy/gunicorn.conf.py``), else ``<state_dir>/prometheus``. It must be chosen
before the first metric is created; ``setup`` does that and switches prometheus_client to its
multiprocess value class even if something imported prometheus_client earlier.

Nothing here knows Flask: the web layer calls ``observe_request`` / ``observe_prediction``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 ... 1.0

_lock = threading.Lock()
_metrics: Metrics | None = None


def metrics_dir(state_dir: Path) -> Path:
    """The multiprocess folder this process uses (the environment wins over the default)."""
    return Path(os.environ.get(ENV) or Path(state_dir) / "prometheus")


def setup(state_dir: Path) -> Path:
    """Choose the folder and make every metric created afterwards write there.

    Idempotent. The environment variable is set (not only read) so that gunicorn workers and
    any library creating its own metrics later agree on the folder.
    """
    from prometheus_client import values

    path = metrics_dir(state_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    return path


def reset_directory(path: Path) -> None:
    """Wipe the folder at server start: counters of a previous run must not leak into this
    one (the prometheus_client docs require a clean folder per server start)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for f in path.glob("*.db"):
        f.unlink(missing_ok=True)


def mark_process_dead(pid: int, path: Path | None = None) -> None:
    """Called by the gunicorn master when a worker exits: drops its live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path) if path else None)


@dataclass
class Metrics:
    """The metric objects of this process (not registered globally: the exposition merges the
    folder's files, and tests may build several apps in one process)."""

    requests: Any
    request_latency: Any
    predictions: Any
    confidence: Any
    predict_latency: Any
    served: Any
    started: Any
    pointer_state: Any
    pointer_problem: Any
    served_version: str | None = None
    pointer: str | None = None


def get_metrics(state_dir: Path, started_at: float | None = None) -> Metrics:
    """One set of metric objects per process, created after ``setup``; ``started_at`` is
    when this process started serving (the server's up-time is the earliest of them)."""
    global _metrics
    with _lock:
        if _metrics is None:
            setup(state_dir)
            from prometheus_client import Counter, Gauge, Histogram

            _metrics = Metrics(
                requests=Counter("urbansound_http_requests", "HTTP requests answered.",
                                 ["endpoint", "method", "status"], registry=None),
                request_latency=Histogram(
                    "urbansound_http_request_duration_seconds", "Time to answer a request.",
                    ["endpoint"], buckets=LATENCY_BUCKETS, registry=None),
                predictions=Counter("urbansound_predictions", "Predictions by predicted class.",
                                    ["label"], registry=None),
                confidence=Histogram("urbansound_prediction_confidence",
                                     "Probability of the predicted class.",
                                     buckets=CONFIDENCE_BUCKETS, registry=None),
                predict_latency=Histogram(
                    "urbansound_predict_latency_seconds",
                    "Server-side time to decode one clip and run the model.",
                    buckets=LATENCY_BUCKETS, registry=None),
                served=Gauge("urbansound_model_served", "Worker processes serving each version.",
                             ["version"], multiprocess_mode="livesum", registry=None),
                started=Gauge("urbansound_start_time_seconds",
                              "Unix time the earliest worker of this server started.",
                              multiprocess_mode="min", registry=None),
                pointer_state=Gauge(
                    "urbansound_model_pointer_state",
                    "Worker processes by model-pointer state: ok, pointer_unreadable, "
                    "hash_mismatch, older_than_pointer.",
                    ["state"], multiprocess_mode="livesum", registry=None),
                pointer_problem=Gauge(
                    "urbansound_model_pointer_problem",
                    "1 while any worker cannot follow the model pointer (unreadable, hash "
                    "mismatch, serving an older version than it names): alert on it.",
                    multiprocess_mode="livemax", registry=None),
            )
            _metrics.started.set(started_at or time.time())
        return _metrics


def _move_worker(gauge: Any, old: str | None, new: str | None) -> None:
    """In a gauge that counts workers per label, this worker leaves ``old`` for ``new``."""
    if old is not None:
        gauge.labels(old).set(0)
    if new is not None:
        gauge.labels(new).set(1)


class Monitor:
    """The web layer's handle on production metrics.

    Metric files are created on first use, not at construction: the Celery worker builds the
    Flask app too (Flask's documented Celery pattern) and must not appear as a web worker."""

    def __init__(self, state_dir: Path, started_at: float | None = None):
        self.state_dir = Path(state_dir)
        self.started_at = started_at or time.time()

    @property
    def metrics(self) -> Metrics:
        return get_metrics(self.state_dir, self.started_at)

    @property
    def path(self) -> Path:
        self.metrics  # noqa: B018 - make sure the folder exists and this process is counted
        return metrics_dir(self.state_dir)

    # ------------------------------------------------------------------ recording

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        m = self.metrics
        m.requests.labels(endpoint, method, str(status)).inc()
        m.request_latency.labels(endpoint).observe(seconds)

    def observe_prediction(self, label: str, confidence: float, seconds: float) -> None:
        m = self.metrics
        m.predictions.labels(label).inc()
        m.confidence.observe(confidence)
        m.predict_latency.observe(seconds)

    def set_served_version(self, version: str | None) -> None:
        """This worker now serves ``version`` (the gauge counts workers per version)."""
        m = self.metrics
        with _lock:
            if version != m.served_version:
                _move_worker(m.served, m.served_version, version)
                m.served_version = version

    def set_pointer_state(self, state: str | None) -> None:
        """This worker's model-pointer state (``prediction.PointerState.state``; None while no
        model is loaded): one worker counted per state, and the problem flag."""
        m = self.metrics
        with _lock:
            if state != m.pointer:
                _move_worker(m.pointer_state, m.pointer, state)
                m.pointer_problem.set(0 if state in (None, "ok") else 1)
                m.pointer = state

    # ------------------------------------------------------------------ reading

    def prometheus_text(self) -> tuple[bytes, str]:
        """Every worker's numbers merged, in the Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.path))
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def samples(self) -> dict[str, list[tuple[str, dict[str, str], float]]]:
        """Merged samples by metric family name: ``[(sample_name, labels, value), ...]``."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        collector = MultiProcessCollector(CollectorRegistry(), path=str(self.path))
        out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for family in collector.collect():
            out[family.name] = [(s.name, dict(s.labels), float(s.value)) for s in family.samples]
        return out

    def uptime_s(self) -> float | None:
        """The server's up-time from its start-time gauge alone. Health checks come every few
        seconds from every load balancer: merging only the ``min``-mode gauge files (that
        gauge's alone) costs a fraction of merging every metric file for ``summary``."""
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [str(f) for f in self.path.glob("gauge_min_*.db")]
        return uptime_from([s.value for family in MultiProcessCollector.merge(files, False)
                            if family.name == "urbansound_start_time_seconds"
                            for s in family.samples])

    def summary(self, model: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON view: requests, error rates, latency percentiles, class mix, confidence."""
        return summarise(self.samples(), model)


# --------------------------------------------------------------------------- summary maths

def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: cumulative ``(upper_bound, count)`` pairs in, the
    linearly interpolated ``q`` quantile out (None without observations). An answer in the
    +Inf bucket is reported as the largest finite bound, as Prometheus does."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


def _histogram(samples: list[tuple[str, dict[str, str], float]], where: dict[str, str] | None = None
               ) -> tuple[list[tuple[float, float]], float, float]:
    """Buckets (summed over label sets matching ``where``), count and sum of one histogram."""
    where = where or {}
    buckets: dict[float, float] = {}
    count = total = 0.0
    for name, labels, value in samples:
        if any(labels.get(k) != v for k, v in where.items()):
            continue
        if name.endswith("_bucket"):
            le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + value
        elif name.endswith("_count"):
            count += value
        elif name.endswith("_sum"):
            total += value
    return sorted(buckets.items()), count, total


def _percentiles_ms(buckets: list[tuple[float, float]], count: float, total: float,
                    histogram: bool = False) -> dict[str, Any]:
    def ms(q: float) -> float | None:
        v = histogram_quantile(q, buckets)
        return None if v is None else round(1000 * v, 2)

    out: dict[str, Any] = {"count": int(count),
                           "mean": round(1000 * total / count, 2) if count else None,
                           "p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99)}
    if histogram:
        previous, rows = 0.0, []
        for bound, cumulative in buckets:
            rows.append({"upper_ms": None if math.isinf(bound) else round(1000 * bound, 3),
                         "count": int(cumulative - previous)})
            previous = cumulative
        out["histogram"] = rows
    return out


def uptime_from(start_times: list[float]) -> float | None:
    """Seconds since the earliest worker started (unset gauges read 0 and are ignored)."""
    started = [t for t in start_times if t > 0]
    return round(time.time() - min(started), 1) if started else None


def summarise(samples: dict[str, list[tuple[str, dict[str, str], float]]],
              model: dict[str, Any] | None = None) -> dict[str, Any]:
    requests = samples.get("urbansound_http_requests", [])
    by_endpoint: dict[str, int] = {}
    by_status: dict[str, int] = {}
    total = 0
    for name, labels, value in requests:
        if not name.endswith("_total"):
            continue
        n = int(value)
        total += n
        by_endpoint[labels["endpoint"]] = by_endpoint.get(labels["endpoint"], 0) + n
        klass = f"{labels['status'][:1]}xx"
        by_status[klass] = by_status.get(klass, 0) + n
    server_errors, client_errors = by_status.get("5xx", 0), by_status.get("4xx", 0)

    per_class: dict[str, int] = {}
    for name, labels, value in samples.get("urbansound_predictions", []):
        if name.endswith("_total") and value:
            per_class[labels["label"]] = per_class.get(labels["label"], 0) + int(value)
    n_pred = sum(per_class.values())

    conf_buckets, conf_count, conf_sum = _histogram(
        samples.get("urbansound_prediction_confidence", []))
    histogram, previous = [], 0.0
    for bound, cumulative in conf_buckets:
        if math.isinf(bound):
            continue
        histogram.append({"upper": bound, "count": int(cumulative - previous)})
        previous = cumulative
    low = next((c for b, c in conf_buckets if abs(b - 0.5) < 1e-9), 0.0)

    served = {labels["version"]: int(value)
              for _, labels, value in samples.get("urbansound_model_served", []) if value}
    pointer_states: dict[str, int] = {}
    for _, labels, value in samples.get("urbansound_model_pointer_state", []):
        if value:
            pointer_states[labels["state"]] = pointer_states.get(labels["state"], 0) + int(value)
    pointer = {"ok": not any(v for _, _, v in samples.get("urbansound_model_pointer_problem",
                                                            [])),
               "workers_by_state": dict(sorted(pointer_states.items()))}
    started = [v for _, _, v in samples.get("urbansound_start_time_seconds", [])]
    return {
        "uptime_s": uptime_from(started),
        "requests": {"total": total, "by_status_class": dict(sorted(by_status.items())),
                     "by_endpoint": dict(sorted(by_endpoint.items()))},
        "error_rate": round(server_errors / total, 4) if total else 0.0,
        "client_error_rate": round(client_errors / total, 4) if total else 0.0,
        "latency_ms": {
            "predict": _percentiles_ms(*_histogram(
                samples.get("urbansound_predict_latency_seconds", [])), histogram=True),
            "predict_request": _percentiles_ms(*_histogram(
                samples.get("urbansound_http_request_duration_seconds", []),
                {"endpoint": "/api/v1/predict"})),
            "all_requests": _percentiles_ms(*_histogram(
                samples.get("urbansound_http_request_duration_seconds", []))),
        },
        "predictions": {
            "total": n_pred,
            "per_class": dict(sorted(per_class.items())),
            "share": {k: round(v / n_pred, 4) for k, v in sorted(per_class.items())},
        },
        "confidence": {
            "count": int(conf_count),
            "mean": round(conf_sum / conf_count, 4) if conf_count else None,
            "below_0_5": round(low / conf_count, 4) if conf_count else None,
            "histogram": histogram,
        },
        "workers_per_version": served,
        "model": {**(model or {}), "pointer": pointer},
    }


# --------------------------------------------------------------------------- drift

def class_mix_drift(production: dict[str, int], training: dict[str, int]) -> dict[str, Any]:
    """Compare the predicted-class mix in production with the training mix.

    Jensen-Shannon distance (base 2, 0 = same mix, 1 = disjoint) is symmetric and finite when
    a class is absent on one side, unlike KL. A shifted mix is not necessarily a problem (the
    street is not the data set), but a large, sudden shift is the cheapest early warning that
    inputs or the model changed.
    """
    classes = sorted(set(production) | set(training))
    n_p, n_t = sum(production.values()), sum(training.values())
    if not classes or not n_p or not n_t:
        return {"js_distance": None, "n_production": n_p, "n_training": n_t, "classes": []}
    p = [production.get(c, 0) / n_p for c in classes]
    t = [training.get(c, 0) / n_t for c in classes]
    m = [(a + b) / 2 for a, b in zip(p, t, strict=True)]

    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    js = math.sqrt(max(0.0, (kl(p, m) + kl(t, m)) / 2))
    rows = [{"class": c, "production": round(a, 4), "training": round(b, 4),
             "difference": round(a - b, 4)} for c, a, b in zip(classes, p, t, strict=True)]
    return {"js_distance": round(js, 4), "n_production": n_p, "n_training": n_t,
            "classes": rows}


def describe_drift(drift: dict[str, Any], confidence: dict[str, Any],
                   model_accuracy: float | None) -> str:
    """A sentence or two computed from the numbers, for the dashboard."""
    if drift.get("js_distance") is None:
        return "No predictions served yet: nothing to compare with the training mix."
    js = drift["js_distance"]
    level = "close to" if js < 0.15 else "noticeably different from" if js < 0.35 else \
        "very different from"
    rows = sorted(drift["classes"], key=lambda r: abs(r["difference"]), reverse=True)
    top = rows[0]
    direction = "more" if top["difference"] > 0 else "less"
    text = (f"Over {drift['n_production']} predictions the predicted-class mix is {level} the "
            f"training mix (Jensen-Shannon distance {js:.2f}); the largest gap is "
            f"{top['class']}, predicted {direction} often ({100 * top['production']:.0f}% vs "
            f"{100 * top['training']:.0f}% of training clips).")
    mean = confidence.get("mean")
    if mean is not None and model_accuracy is not None:
        gap = model_accuracy - mean
        if gap > 0.1:
            text += (f" Mean confidence {mean:.2f} is well below the test accuracy "
                     f"{model_accuracy:.2f}: inputs may differ from the training data.")
        else:
            text += (f" Mean confidence {mean:.2f} is in line with the test accuracy "
                     f"{model_accuracy:.2f}.")
    return text
