"""The REST API (``/api/v1``): thin views over ``src``; schemas in ``schemas.py`` make the
OpenAPI document. Predictions and reads are open; anything that changes state (uploads,
retraining, activating a model) needs ``Authorization: Bearer <URBANSOUND_API_TOKEN>``."""

from __future__ import annotations

import time
from typing import Any

from apiflask import APIBlueprint, APIFlask
from flask import Response, render_template, request, url_for
from werkzeug.utils import secure_filename

from src import jobs

from . import package_version, schemas, services
from .errors import api_error
from .security import token_auth

MIB = 1 << 20
MAX_ID = 2**63 - 1  # larger ids cannot exist (BIGINT) and would overflow the driver
api = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="API")

AUDIO_TYPES = ("audio/wav", "audio/x-wav", "audio/flac", "audio/ogg", "audio/mpeg",
               "application/octet-stream")
REQUEST_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/v1/predict", "post"): {
        "required": True,
        "description": "One audio clip (WAV, FLAC, OGG, MP3...), as multipart field `file` or "
                       "as the raw request body.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in AUDIO_TYPES},
        },
    },
    ("/api/v1/uploads", "post"): {
        "required": True,
        "description": "Labelled clips: many `files` (label = the parent folder in each file "
                       "name, e.g. `dog_bark/a.wav`), zip archives of class folders, or a "
                       "`label` field for all of them. A raw `application/zip` body works too.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "label": {"type": "string"}}}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def add_request_bodies(spec: dict) -> dict:
    """Bodies that are files or raw bytes are described here, not with ``@input``: the views
    read them as streams (bounded by size limits) instead of through a schema."""
    for (path, method), body in REQUEST_BODIES.items():
        operation = spec.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation["requestBody"] = body
    return spec


# --------------------------------------------------------------------------- predict

#: A missing ``@file`` makes curl send an empty body (``--data-binary @missing.zip`` warns once
#: and posts nothing), so say that, not which multipart field was absent.
EMPTY_BODY = ("The request body was empty: no file was sent. Check that the file you attach "
              "exists (curl sends an empty body when it cannot read @FILE).")


def read_clip(settings) -> tuple[bytes, str | None]:
    """The clip's bytes from multipart ``file`` or the raw body; size-checked, name sanitised."""
    limit = settings.max_clip_mb * MIB
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise api_error(400, "missing_file",
                            "Send the clip as multipart field 'file' or as the request body.")
        data = upload.stream.read(limit + 1)
        name = secure_filename(upload.filename or "") or None
    elif mimetype in ("application/x-www-form-urlencoded", "application/json") \
            or mimetype.startswith("text/"):
        raise api_error(415, "unsupported_media_type",
                        f"Expected audio bytes or multipart/form-data, not {mimetype}.")
    else:
        if (request.content_length or 0) > limit:
            raise api_error(413, "too_large", f"A clip may be at most {settings.max_clip_mb} MiB.")
        data = request.get_data(cache=False)
        name = None
    if len(data) > limit:
        raise api_error(413, "too_large", f"A clip may be at most {settings.max_clip_mb} MiB.")
    if not data:
        raise api_error(400, "empty", EMPTY_BODY if request.content_length in (None, 0)
                        else "The file is empty.")
    return data, name


def run_prediction(data: bytes, top_k: int = 3) -> tuple[Any, Any, float, Any]:
    """Decode + classify with one model version captured up front, so the version a response
    names is the one that computed it even if a swap happens mid-request.

    Returns ``(prediction, predictor, latency_s, waveform)``."""
    st = services.state()
    predictor = st.predictor()
    if predictor is None:
        raise api_error(503, "no_model", "No model is being served yet: "
                        f"{st.predictors.error or 'still loading'}.")
    started = time.perf_counter()
    waveform = predictor.load(data)  # AudioError (a UserError) says what is wrong with it
    probabilities = predictor.probabilities(waveform)[0]
    prediction = predictor.from_probabilities(probabilities, top_k)
    latency = time.perf_counter() - started
    st.monitor.observe_prediction(prediction.label, prediction.confidence, latency)
    return prediction, predictor, latency, waveform


@api.post("/predict")
@api.input(schemas.TopKQuery, location="query", arg_name="query")
@api.output(schemas.PredictionOut)
@api.doc(responses={
    400: "No file, or an empty one", 413: "The clip is larger than URBANSOUND_MAX_CLIP_MB",
    415: "Not audio we can decode", 422: "Audio we cannot use (silent, too short, odd rate)",
    503: "No model is being served yet"})
def predict(query: dict):
    """Classify one clip.

    Label one clip: the predicted class, its probability, all class probabilities, the
    model version that answered and the server-side latency."""
    settings = services.state().settings
    data, name = read_clip(settings)
    prediction, _, latency, _ = run_prediction(data, query["top_k"])
    out = {**prediction.to_dict(), "latency_ms": round(1000 * latency, 2), "file": name}
    if query.get("keep"):
        out["prediction_id"] = keep_clip(data, name)
    return out


def keep_clip(data: bytes, filename: str | None) -> str:
    """Keep a predicted clip for an hour so that a wrong answer can be corrected."""
    from src import feedback

    return feedback.keep(data, secure_filename(filename or "") or None,
                         services.state().settings)


def store_feedback(prediction_id: str, label: str, client: str, source: str = "ui"
                   ) -> dict[str, Any]:
    """The kept clip of ``prediction_id`` as a labelled upload: the upload report."""
    from src import feedback

    report = feedback.record(prediction_id, label, source=source, client=client,
                             settings=services.state().settings)
    return upload_report(report)


@api.post("/predictions/<prediction_id>/feedback")
@api.auth_required(token_auth)
@api.input(schemas.FeedbackIn, location="json", arg_name="body")
@api.output(schemas.UploadReport, status_code=201)
@api.doc(responses={
    400: "Not JSON", 404: "Unknown prediction id, or kept longer ago than an hour",
    422: "Unknown label", 503: "The database is unavailable"})
def feedback(prediction_id: str, body: dict):
    """Correct a prediction ("Wrong? It was ...").

    Store the clip of a prediction made with ``?keep=true`` as a labelled upload, through the
    same checks as any upload (a clip of the gate's test set is refused: ``in_test_set``).
    The next retrain learns from it."""
    return store_feedback(prediction_id, body["label"], f"api:{request.remote_addr or '-'}",
                          source="api")


# --------------------------------------------------------------------------- uploads

def safe_relative_name(name: str) -> str:
    """``dog_bark/x.wav`` stays (the folder is the label), every part is sanitised, so no
    ``..``, absolute path or odd byte reaches the store or a log."""
    parts = [secure_filename(p) for p in str(name).replace("\\", "/").split("/")]
    return "/".join(p for p in parts if p) or "unnamed"


def ingest_request(source: str, client: str) -> dict[str, Any]:
    """Multipart ``files``/``file`` (+ optional ``label``) or a raw zip → ``ingest.ingest``."""
    from src import ingest

    label = request.form.get("label") or request.args.get("label") or None
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        uploads = request.files.getlist("files") + request.files.getlist("file")
        items = [(safe_relative_name(f.filename or "unnamed"), f.stream) for f in uploads]
    elif mimetype in ("application/zip", "application/x-zip-compressed",
                      "application/octet-stream"):
        body = request.get_data(cache=False)
        items = [("upload.zip", body)] if body else []
    else:
        raise api_error(415, "unsupported_media_type",
                        "Send multipart/form-data with 'files', or an application/zip body.")
    if not items:
        raise api_error(400, "no_files", EMPTY_BODY if not request.content_length
                        else "No files in the request (multipart field 'files').")
    report = ingest.ingest(items, label=label, source=source, client=client)
    return upload_report(report)


def upload_report(report: Any) -> dict[str, Any]:
    """An ``IngestReport`` as answered to clients."""
    out = report.to_dict()
    for verdict in out["accepted"] + out["rejected"]:
        verdict.pop("path", None)  # where we keep files is our business
    return out


@api.post("/uploads")
@api.auth_required(token_auth)
@api.output(schemas.UploadReport, status_code=201, headers={
    "Location": {"description": "The upload's record", "type": "string"}})
@api.doc(responses={
    400: "No files, or an unknown label", 413: "The request is larger than "
    "URBANSOUND_MAX_UPLOAD_MB", 415: "Neither multipart nor a zip body",
    503: "The database is unavailable"})
def create_upload():
    """Upload labelled clips.

    Upload many clips (or zips of class folders): each file is checked and stored, or
    rejected with a reason. Nothing accepted is lost; duplicates (by sha256) are rejected."""
    report = ingest_request("api", request.remote_addr or "")
    headers = {}
    if report.get("upload_id") is not None:
        headers["Location"] = url_for("api.get_upload", upload_id=report["upload_id"])
    return report, 201, headers


@api.get("/uploads")
@api.input(schemas.PageQuery, location="query", arg_name="query")
@api.output(schemas.UploadList)
@api.doc(responses={503: "The database is unavailable"})
def list_uploads(query: dict):
    """List uploads.

    Upload batches, newest first, with counts per class and how many clips wait for a
    retrain."""
    items, total = services.list_uploads(query["limit"], query["offset"])
    return {"items": items, "total": total, "limit": query["limit"], "offset": query["offset"],
            "stats": services.upload_stats()}


@api.get("/uploads/<int:upload_id>")
@api.output(schemas.UploadDetail)
@api.doc(responses={503: "The database is unavailable"})
def get_upload(upload_id: int):
    """One upload.

    One upload batch: its accepted clips and its rejected files with reasons."""
    upload = services.get_upload(upload_id) if upload_id <= MAX_ID else None
    if upload is None:
        raise api_error(404, "not_found", f"No upload {upload_id}.")
    return upload


# --------------------------------------------------------------------------- retraining

def start_retrain(requested_by: str, params: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Queue a retrain (or find the running one). Refusals are the core's ``UserError``s:
    not ready (409, with the plan), bad parameters (422), broker down (503, with the job)."""
    return jobs.request_retrain(requested_by, params)


@api.get("/retrain/plan")
@api.output(schemas.RetrainPlan)
@api.doc(responses={503: "The database is unavailable"})
def retrain_plan():
    """What a retrain would use.

    The base training clips, the new uploads and the test set the quality gate would grade
    on, or exactly what is missing (with the command that fixes it) before a retrain can
    run."""
    return jobs.retrain_plan()


@api.post("/retrain")
@api.auth_required(token_auth)
@api.input(schemas.RetrainIn, location="json", arg_name="body")
@api.output(schemas.RetrainOut, status_code=202, headers={
    "Location": {"description": "Poll this job", "type": "string"}})
@api.doc(responses={
    200: "A job was already queued or running: that job (created = false)",
    400: "The body is not valid JSON", 409: "Nothing a retrain could use yet (see `plan`)",
    422: "Bad parameters", 503: "The broker or the database is unavailable"})
def retrain(body: dict):
    """Start a retraining job.

    Fine-tune the served model on the uploads not used yet; poll the ``Location``. Only one
    job runs at a time: asking again returns the running job with status 200."""
    params = {k: v for k, v in body.items() if v is not None}
    job, created = start_retrain(f"api:{request.remote_addr or '-'}", params)
    location = url_for("api.get_job", job_id=job["id"])
    return {"created": created, "job": job}, 202 if created else 200, {"Location": location}


@api.get("/jobs/<job_id>")
@api.output(schemas.JobDetail)
@api.doc(responses={503: "The database is unavailable"})
def get_job(job_id: str):
    """One retraining job.

    State, progress (epoch, loss, validation F1) and, once done, the result: promoted or
    rejected, and why."""
    job = jobs.get_job(job_id)
    if job is None:
        raise api_error(404, "not_found", f"No job {job_id}.")
    return job


@api.get("/jobs")
@api.input(schemas.LimitQuery, location="query", arg_name="query")
@api.output(schemas.JobList)
@api.doc(responses={503: "The database is unavailable"})
def list_jobs(query: dict):
    """Recent retraining jobs.

    The most recent jobs, newest first."""
    return {"items": jobs.list_jobs(query["limit"])}


# --------------------------------------------------------------------------- models

def version_out(info: Any) -> dict[str, Any]:
    d = info.to_dict()
    keep = ("accuracy", "macro_f1", "loss", "precision", "recall", "n", "split", "test_folds",
            "per_class", "weighted_f1")
    d["metrics"] = {k: v for k, v in (d.get("metrics") or {}).items() if k in keep}
    return d


def list_versions() -> list[Any]:
    """Registry versions with database facts merged in when the database answers."""
    from src import registry
    from src.db import DatabaseUnavailable, session_scope

    settings = services.state().settings
    try:
        with session_scope(settings.db_url) as session:
            return registry.list_versions(settings.models_dir, session=session)
    except DatabaseUnavailable:
        return registry.list_versions(settings.models_dir)


@api.get("/models")
@api.output(schemas.ModelList)
def list_models():
    """Model versions.

    Every version, newest first: status (active, candidate, rejected, retired), parent and
    test metrics."""
    from src import registry

    pointer = registry.read_pointer(services.state().settings.models_dir)
    return {"served": pointer["version"] if pointer else None,
            "items": [version_out(v) for v in list_versions()]}


def activate_version(version: str, force: bool = False) -> dict[str, Any]:
    """Serve ``version`` (a rollback is the same operation with an older one) and make this
    process follow at once; refusals are ``registry.RegistryError``s (404/409)."""
    from src import registry

    st = services.state()
    result = registry.serve(version, force=force, models_dir=st.settings.models_dir,
                            db_url=st.settings.db_url)
    st.predictors.refresh()
    serving = st.predictor()
    return {**result, "serving": serving.version if serving is not None else None}


@api.post("/models/<version>/activate")
@api.auth_required(token_auth)
@api.input(schemas.ActivateQuery, location="query", arg_name="query")
@api.output(schemas.ActivateOut)
@api.doc(responses={
    400: "Not a valid version name", 404: "No such version",
    409: "The version is rejected (use force) or corrupt"})
def activate(version: str, query: dict):
    """Serve a version (rollback).

    Atomically switch the served model; every worker follows within a second. Rolling back
    is activating an older version."""
    return activate_version(version, query["force"])


# --------------------------------------------------------------------------- operations

def served_model_info() -> dict[str, Any]:
    """The served version's test metrics and training mix (for /metrics and the dashboard)."""
    from src import registry

    predictor = services.state().predictor()
    if predictor is None:
        return {}
    data: dict[str, Any] = {}
    if predictor.checkpoint_path is not None:
        try:
            data = registry.read_metadata(predictor.checkpoint_path).get("data") or {}
        except registry.RegistryError:
            data = {}
    m = predictor.metrics or {}
    return {
        "version": predictor.version,
        "metrics": {k: m.get(k) for k in ("accuracy", "macro_f1", "loss", "precision", "recall",
                                          "n", "split") if k in m},
        "training_mix": (data.get("train") or {}).get("per_class") or {},
    }


def metrics_summary() -> dict[str, Any]:
    from src.monitoring import class_mix_drift, describe_drift

    st = services.state()
    model = served_model_info()
    out = st.monitor.summary({k: v for k, v in model.items() if k != "training_mix"})
    drift = class_mix_drift(out["predictions"]["per_class"], model.get("training_mix") or {})
    drift["interpretation"] = describe_drift(drift, out["confidence"],
                                             (model.get("metrics") or {}).get("accuracy"))
    out["drift"] = drift
    return out


def health_data() -> dict[str, Any]:
    from src import registry

    st = services.state()
    predictor = st.predictor()
    pointer = registry.read_pointer(st.settings.models_dir) or {}
    activated = pointer.get("activated_at") if predictor is not None and \
        pointer.get("version") == predictor.version else None
    model_uptime = None
    if activated:
        from datetime import datetime

        model_uptime = round(time.time() - datetime.fromisoformat(activated).timestamp(), 1)
    elif predictor is not None and st.predictors.loaded_at:
        model_uptime = round(time.time() - st.predictors.loaded_at, 1)
    uptime = st.monitor.uptime_s()
    return {
        "status": "ok",
        "uptime_s": uptime,
        "process_uptime_s": round(time.time() - st.started_at, 1),
        "model_version": predictor.version if predictor is not None else None,
        "model_loaded": predictor is not None,
        "model_activated_at": activated,
        "model_uptime_s": model_uptime,
        "version": package_version(),
    }


@api.get("/health")
@api.output(schemas.HealthOut)
def health():
    """Liveness.

    Always 200 while the process answers: up-time and the served model version."""
    return health_data()


def readiness() -> dict[str, Any]:
    st = services.state()
    predictor = st.predictor()
    checks = {
        "model": {"ok": predictor is not None,
                  "message": f"serving {predictor.version}" if predictor is not None
                  else (st.predictors.error or "no model loaded")},
    }
    for name, error in (("database", services.database_error(st.settings)),
                        ("broker", services.broker_error(st.settings))):
        checks[name] = {"ok": error is None, "message": error or "reachable"}
    return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}


@api.get("/ready")
@api.output(schemas.ReadyOut)
@api.doc(responses={503: "Not ready: the failing checks are listed"})
def ready():
    """Readiness.

    200 when a model is loaded and the database and broker answer; 503 otherwise (a load
    balancer should stop sending traffic here)."""
    result = readiness()
    if not result["ready"]:
        failing = ", ".join(f"{k}: {v['message']}" for k, v in result["checks"].items()
                            if not v["ok"])
        raise api_error(503, "not_ready", f"Not ready ({failing}).", checks=result["checks"])
    return result


@api.get("/metrics")
@api.output(schemas.MetricsOut)
def metrics_json():
    """Production metrics (JSON).

    Requests, error rates, latency p50/p95/p99, predictions per class, the confidence
    distribution and drift against the training mix, summed over all server workers; plus the
    served model's test metrics."""
    return metrics_summary()


@api.get("/docs")
@api.doc(hide=True)
def docs():
    """The OpenAPI document rendered as a page (no external scripts)."""
    from flask import current_app

    return render_template("api_docs.html", spec=current_app.spec)


def register_prometheus(app: APIFlask) -> None:
    @app.get("/metrics")
    @app.doc(summary="Prometheus metrics", tags=["Operations"], responses={
        200: {"description": "Prometheus text format, all workers merged",
              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def prometheus_metrics():
        """Prometheus text exposition, merged across all gunicorn workers."""
        body, content_type = services.state().monitor.prometheus_text()
        return Response(body, content_type=content_type)
