"""The REST API (``/api/v1``): thin views over ``src``; schemas in ``schemas.py`` make the
OpenAPI document. Predictions and reads are open; anything that changes state (uploads,
retraining, activating a model) needs ``Authorization: Bearer <URBANSOUND_API_TOKEN>``."""

from __future__ import annotations

import io
import logging
import tempfile
import time
from typing import IO, Any, cast

from apiflask import APIBlueprint, APIFlask, fields
from flask import Response, render_template, request, url_for
from werkzeug.utils import secure_filename

from src import jobs
from src.errors import UserError

from . import package_version, schemas, services
from .errors import api_error
from .security import token_auth

log = logging.getLogger(__name__)
MIB = 1 << 20
MAX_ID = 2**63 - 1  # larger ids cannot exist (BIGINT) and would overflow the driver
api = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="API")


@api.record_once
def _sweep_abandoned_staging(_state: Any) -> None:
    """At start-up (each app the factory builds): remove the upload staging folders of
    processes killed mid-upload. Only folders no live process holds are touched, so a sibling
    gunicorn worker already uploading keeps its own."""
    from src import ingest
    from src.settings import get_settings

    try:
        ingest.sweep_staging(get_settings())
    except Exception:  # a start-up chore: never a reason not to serve
        log.exception("could not sweep the upload staging folder")

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
    ("/api/v1/analyze", "post"): {
        "required": True,
        "description": "One recording of any length (WAV, FLAC, OGG, MP3...), as multipart "
                       "field `file` or as the raw request body; at most "
                       "URBANSOUND_MAX_ANALYZE_MB.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in AUDIO_TYPES},
        },
    },
    ("/api/v1/predict/batch", "post"): {
        "required": True,
        "description": "Many audio clips as multipart parts named `files` (or `file`); one "
                       "result per part, in order.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {
                    "files": {"type": "array", "minItems": 1,
                              "items": {"type": "string", "format": "binary"}}}}},
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


def location_header(description: str) -> fields.String:
    """A response's ``Location`` header for the OpenAPI document. APIFlask documents header
    *fields*; a plain dict of OpenAPI keys, as these were until 5 Dec, rendered as no header
    at all (mypy found it)."""
    return fields.String(required=True, metadata={"description": description})


def add_request_bodies(spec: dict | str) -> dict | str:
    """Bodies that are files or raw bytes are described here, not with ``@input``: the views
    read them as streams (bounded by size limits) instead of through a schema. (APIFlask hands
    a spec processor text when asked for a YAML document, which has nothing to add.)"""
    if isinstance(spec, str):
        return spec
    for (path, method), body in REQUEST_BODIES.items():
        operation = spec.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation["requestBody"] = body
    schemas_ = spec.get("components", {}).get("schemas", {})
    for operations in spec.get("paths", {}).values():  # a JSON body with required fields is
        for operation in operations.values():          # itself required (apispec omits it)
            declared = operation.get("requestBody") if isinstance(operation, dict) else None
            if not declared:
                continue
            ref = ((declared.get("content") or {}).get("application/json") or {}) \
                .get("schema", {}).get("$ref", "")
            if ref and schemas_.get(ref.rsplit("/", 1)[-1], {}).get("required"):
                declared["required"] = True
    too_many = {"description": "Too many failed authentications or changes from this address "
                "(see Retry-After)", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/HTTPError"}}}}
    for operations in spec.get("paths", {}).values():  # every authenticated call is limited
        for operation in operations.values():
            if isinstance(operation, dict) and operation.get("security"):
                operation.setdefault("responses", {}).setdefault("429", too_many)
    return spec


# --------------------------------------------------------------------------- predict

#: A missing ``@file`` makes curl send an empty body (``--data-binary @missing.zip`` warns once
#: and posts nothing), so say that, not which multipart field was absent.
EMPTY_BODY = ("The request body was empty: no file was sent. Check that the file you attach "
              "exists (curl sends an empty body when it cannot read @FILE).")
#: A multipart part without a file: a form whose file input was left empty sends one with no
#: file name and no bytes. Not "the file is empty": there is no file.
NO_FILE = ("No file was sent: attach the clip as multipart field 'file' "
           "(curl -F file=@clip.wav) or send it as the request body.")
CHUNK = 1 << 16


class ClipError(UserError):
    """One clip of a request is unusable (none sent, empty, too large): the request's error
    for ``/predict``, that file's own error in a batch."""

    code = "bad_clip"
    status = 400


def too_large(limit_mb: int, what: str = "A clip") -> ClipError:
    return ClipError(f"{what} may be at most {limit_mb} MiB.", code="too_large", status=413)


def read_body(limit: int, spool: bool = False) -> tuple[IO[bytes], int]:
    """The raw request body, at most ``limit`` bytes, as a file positioned at its start, and
    its size; a larger body is a 413 before anything uses it.

    ``MAX_CONTENT_LENGTH`` alone does not bound a chunked body (no ``Content-Length``):
    werkzeug's stream then stops quietly at the limit and ``get_data()`` returns the first
    ``limit`` bytes, so a too-large zip used to arrive truncated (recorded as a bad archive).
    Reading here in blocks and failing past the limit closes that. ``spool=True`` keeps a big
    body on disk (an anonymous temporary file) instead of in memory."""
    if (request.content_length or 0) > limit:
        raise too_large(limit // MIB, "The request body")
    out: IO[bytes] = (tempfile.SpooledTemporaryFile(max_size=8 * MIB)  # noqa: SIM115 - returned
                      if spool else io.BytesIO())
    n = 0
    try:
        while block := request.stream.read(min(CHUNK, limit + 1 - n)):
            n += len(block)
            if n > limit:
                raise too_large(limit // MIB, "The request body")
            out.write(block)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out, n


def read_part(upload: Any, limit_mb: int) -> tuple[bytes, str | None]:
    """One multipart file part: its bytes (at most ``limit_mb``) and its sanitised name."""
    limit = limit_mb * MIB
    data = upload.stream.read(limit + 1)
    name = secure_filename(upload.filename or "") or None
    if not data and not upload.filename:
        raise ClipError(NO_FILE, code="missing_file")
    if len(data) > limit:
        raise too_large(limit_mb)
    if not data:
        raise ClipError("The file is empty.", code="empty")
    return data, name


def file_parts() -> list[Any]:
    """The multipart file parts named ``files`` or ``file``, in the order they were sent."""
    return [f for key, f in request.files.items(multi=True) if key in ("files", "file")]


def read_clip(settings) -> tuple[bytes, str | None]:
    """The clip's bytes from multipart ``file`` or the raw body; size-checked, name sanitised.
    One clip only: several files are refused (``one_file_only``), not half answered."""
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        parts = file_parts()
        if len(parts) > 1:
            raise api_error(400, "one_file_only",
                            f"{len(parts)} files were sent; /predict classifies one clip. "
                            "Send several to /api/v1/predict/batch (multipart 'files').")
        if not parts:
            raise api_error(400, "missing_file", NO_FILE)
        return read_part(parts[0], settings.max_clip_mb)
    if mimetype in ("application/x-www-form-urlencoded", "application/json") \
            or mimetype.startswith("text/"):
        raise api_error(415, "unsupported_media_type",
                        f"Expected audio bytes or multipart/form-data, not {mimetype}.")
    try:
        body, _ = read_body(settings.max_clip_mb * MIB)
    except ClipError:
        raise too_large(settings.max_clip_mb) from None
    data = body.read()
    if not data:
        raise api_error(400, "empty", EMPTY_BODY)
    return data, None


def serving_predictor() -> Any:
    """The model version being served now; 503 when there is none."""
    st = services.state()
    predictor = st.predictor()
    if predictor is None:
        raise api_error(503, "no_model", "No model is being served yet: "
                        f"{st.predictors.error or 'still loading'}.")
    return predictor


def run_prediction(data: bytes, top_k: int = 3, predictor: Any = None
                   ) -> tuple[Any, Any, float, Any]:
    """Decode + classify with one model version captured up front (or the ``predictor``
    given: a batch captures one for all its files), so the version a response names is the
    one that computed it even if a swap happens mid-request.

    Returns ``(prediction, predictor, latency_s, waveform)``."""
    if predictor is None:
        predictor = serving_predictor()
    started = time.perf_counter()
    # AudioError (a UserError) says what is wrong with it
    waveform, duration_s, analysed_s = predictor.load_measured(data)
    probabilities = predictor.probabilities(waveform)[0]
    prediction = predictor.answer(probabilities, duration_s, analysed_s, top_k)
    latency = time.perf_counter() - started
    services.state().monitor.observe_prediction(prediction.label, prediction.confidence,
                                                latency)
    return prediction, predictor, latency, waveform


def prediction_out(data: bytes, name: str | None, top_k: int, predictor: Any = None
                   ) -> dict[str, Any]:
    """What ``/predict`` answers for one clip (and a batch for each of its files)."""
    prediction, _, latency, _ = run_prediction(data, top_k, predictor)
    return {**prediction.to_dict(), "latency_ms": round(1000 * latency, 2), "file": name}


@api.post("/predict")
@api.input(schemas.TopKQuery, location="query", arg_name="query")
@api.output(schemas.PredictionOut)
@api.doc(responses={
    400: "No file, an empty one, or several (use /predict/batch)",
    413: "The clip is larger than URBANSOUND_MAX_CLIP_MB",
    415: "Not audio we can decode", 422: "Audio we cannot use (silent, too short, odd rate)",
    503: "No model is being served yet"})
def predict(query: dict):
    """Classify one clip.

    Label one clip: the predicted class, its probability, all class probabilities, the
    model version that answered and the server-side latency. Several clips: use
    ``/predict/batch``."""
    settings = services.state().settings
    data, name = read_clip(settings)
    out = prediction_out(data, name, query["top_k"])
    if query.get("keep"):
        out["prediction_id"] = keep_clip(data, name)
    return out


@api.post("/predict/batch")
@api.input(schemas.BatchQuery, location="query", arg_name="query")
@api.output(schemas.BatchPredictionOut)
@api.doc(responses={
    400: "No files", 413: "More than URBANSOUND_MAX_BATCH_FILES files, or a request larger "
    "than URBANSOUND_MAX_UPLOAD_MB", 415: "Not multipart/form-data",
    503: "No model is being served yet"})
def predict_batch(query: dict):
    """Classify many clips.

    Multipart ``files`` (and/or ``file``) parts, one result per file in the order sent: the
    same fields as ``/predict``, or ``file`` and its own ``error`` (``code``, ``message``)
    when that file is unusable; one bad file does not fail the others. One model version
    answers the whole batch, even if a new one is activated meanwhile."""
    settings = services.state().settings
    if (request.mimetype or "") != "multipart/form-data":
        raise api_error(415, "unsupported_media_type",
                        "Send the clips as multipart/form-data parts named 'files'.")
    parts = [p for p in file_parts() if p.filename]  # a form's empty file input: no file
    if not parts:
        raise api_error(400, "missing_file", "No file was sent: attach the clips as multipart "
                        "parts named 'files' (curl -F files=@a.wav -F files=@b.wav).")
    if len(parts) > settings.max_batch_files:
        raise api_error(413, "too_many_files",
                        f"{len(parts)} files were sent; a batch holds at most "
                        f"{settings.max_batch_files} (URBANSOUND_MAX_BATCH_FILES): split it.")
    predictor = serving_predictor()
    results: list[dict[str, Any]] = []
    for part in parts:
        name = secure_filename(part.filename or "") or None
        try:
            data, name = read_part(part, settings.max_clip_mb)
            results.append(prediction_out(data, name, query["top_k"], predictor))
        except UserError as exc:  # this file's problem (AudioError, ClipError): its result
            results.append({"file": name, "error": {"code": exc.code, "message": exc.message}})
    n_failed = sum("error" in r for r in results)
    return {"model_version": predictor.version, "n_files": len(results),
            "n_ok": len(results) - n_failed, "n_failed": n_failed, "results": results}


# --------------------------------------------------------------------------- analyze

def read_recording(settings) -> tuple[IO[bytes], str | None]:
    """A recording from multipart ``file`` or the raw body, kept on disk past 8 MiB (werkzeug
    spools multipart parts; ``read_body`` the raw body), at most ``max_analyze_mb``: 413 past
    it. The caller closes it."""
    limit = settings.max_analyze_mb * MIB
    request.max_content_length = settings.max_body_mb * MIB  # this request's cap (nginx's too)
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        parts = file_parts()
        if len(parts) > 1:
            raise api_error(400, "one_file_only",
                            f"{len(parts)} files were sent; /analyze takes one recording.")
        if not parts or (not parts[0].filename and not _has_bytes(parts[0].stream)):
            raise api_error(400, "missing_file", NO_FILE)
        stream = parts[0].stream
        stream.seek(0, 2)
        size = stream.tell()
        stream.seek(0)
        if size > limit:
            raise too_large(settings.max_analyze_mb, "A recording")
        if not size:
            raise ClipError("The file is empty.", code="empty")
        return stream, secure_filename(parts[0].filename or "") or None
    if mimetype in ("application/x-www-form-urlencoded", "application/json") \
            or mimetype.startswith("text/"):
        raise api_error(415, "unsupported_media_type",
                        f"Expected audio bytes or multipart/form-data, not {mimetype}.")
    try:
        body, size = read_body(limit, spool=True)
    except ClipError:
        raise too_large(settings.max_analyze_mb, "A recording") from None
    if not size:
        body.close()
        raise api_error(400, "empty", EMPTY_BODY)
    return body, None


def analyze_recording(stream: IO[bytes], name: str | None, params: dict[str, Any],
                      keep_audio: bool = False) -> tuple[dict[str, Any], int]:
    """Analyse a recording in this request when its header says it is short enough
    (``analyze_sync_max_s``), else queue a job: ``(analysis, 200)`` or ``(job, 202)``.

    Window and hop are checked against the served model first, so a bad one is a 422 now,
    not a failed job later."""
    from src import analysis, analysis_jobs, preprocessing

    st = services.state()
    settings = st.settings
    predictor = serving_predictor()
    options = services.analysis_options(predictor, params)
    info = preprocessing.probe(stream)  # the header: bad audio is refused before any job
    stream.seek(0)
    short = info.duration <= settings.analyze_sync_max_s
    if short and not keep_audio:
        started = time.perf_counter()
        result = analysis.analyse(stream, predictor, options, name=name).to_dict()
        result["latency_ms"] = round(1000 * (time.perf_counter() - started), 2)
        return result, 200
    job = analysis_jobs.create(stream, name, {k: v for k, v in params.items() if v is not None},
                               settings, keep_audio=keep_audio)
    if short:  # kept for the page's player, but analysed here and now
        def work(path: Any, on_progress: Any) -> dict[str, Any]:
            return analysis.analyse(path, predictor, options, on_progress,
                                    name=name).to_dict(envelope=True)

        return analysis_jobs.run(job["id"], work, settings), 200
    try:
        services.queue_analysis(job["id"], settings)
    except Exception as exc:
        job = analysis_jobs.fail(job["id"], f"The task broker is unreachable: {exc}", settings)
        raise jobs.BrokerUnavailable(
            "The analysis could not be queued: the task broker is unreachable. Retry later, "
            "or analyse a shorter recording.", job) from None
    return job, 202


@api.post("/analyze")
@api.input(schemas.AnalyzeQuery, location="query", arg_name="query")
@api.output(schemas.AnalysisOut)
# APIFlask's annotation takes all descriptions or all response objects; it renders a mix
@api.doc(responses={  # type: ignore[arg-type]
    202: {"description": "Longer than URBANSOUND_ANALYZE_SYNC_MAX_S: a job was queued; poll "
          "the Location (`GET /analyses/{job_id}`)", "content": {"application/json": {
              "schema": {"$ref": "#/components/schemas/AnalysisJob"}}}},
    400: "No file, an empty one, or several",
    413: "The recording is larger than URBANSOUND_MAX_ANALYZE_MB",
    415: "Not audio we can decode",
    422: "Audio we cannot use (too short, odd rate), or a window/hop the model cannot use",
    503: "No model is being served yet, or the task broker is down"})
def analyze(query: dict):
    """Analyse a long recording.

    Cut the recording into windows (``window_s``, default 4 s, every ``hop_s``, default 2 s),
    classify every window with the served model and merge them into a timeline: per-window
    probabilities, **events** (runs of one class: label, start, end, mean confidence; stretches
    below ``min_confidence`` are ``uncertain``, near-digital silence is ``silence``) and
    seconds per class. Recordings up to URBANSOUND_ANALYZE_SYNC_MAX_S are answered at once
    (200); longer ones become a job (202 + ``Location``) whose ``result`` is this same
    object."""
    settings = services.state().settings
    stream, name = read_recording(settings)
    try:
        out, status = analyze_recording(stream, name, query)
    finally:
        stream.close()
    if status == 202:
        from flask import jsonify

        response = jsonify(out)
        response.status_code = 202
        response.headers["Location"] = url_for("api.get_analysis", job_id=out["id"])
        return response
    return out


@api.get("/analyses/<job_id>")
@api.output(schemas.AnalysisJob)
@api.doc(responses={404: "No such analysis (or it expired)"})
def get_analysis(job_id: str):
    """One analysis job.

    State (queued, running, succeeded, failed), progress (seconds analysed of the
    recording's length) and, once it succeeded, ``result``: the object ``POST /analyze``
    answers for a short recording."""
    from src import analysis_jobs

    job = analysis_jobs.get(job_id, services.state().settings)
    if job.get("result"):
        job["result"].pop("envelope", None)  # the page's waveform strip, not the contract
    return job


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
    body: IO[bytes] | None = None
    if mimetype == "multipart/form-data":
        # A part with no file name and no bytes is a form's file input left empty: no file.
        uploads = [f for f in file_parts() if f.filename or f.content_length
                   or _has_bytes(f.stream)]
        items: list[tuple[str, Any]] = [
            (safe_relative_name(f.filename or "unnamed"), f.stream) for f in uploads]
    elif mimetype in ("application/zip", "application/x-zip-compressed",
                      "application/octet-stream"):
        # The whole body is read (bounded; 413 past the limit) before anything is recorded.
        body, size = read_body(services.state().settings.max_upload_mb * MIB, spool=True)
        items = [("upload.zip", body)] if size else []
    else:
        raise api_error(415, "unsupported_media_type",
                        "Send multipart/form-data with 'files', or an application/zip body.")
    try:
        if not items:
            raise api_error(400, "no_files", EMPTY_BODY if mimetype != "multipart/form-data"
                            else "No file was sent: attach the clips as multipart parts named "
                            "'files' (curl -F files=@dog_bark/a.wav).")
        report = ingest.ingest(items, label=label, source=source, client=client)
    finally:
        if body is not None:
            body.close()
    return upload_report(report)


def _has_bytes(stream: IO[bytes]) -> bool:
    """Whether a multipart part's (seekable, spooled) stream holds anything."""
    position = stream.tell()
    try:
        return bool(stream.read(1))
    finally:
        stream.seek(position)


def upload_report(report: Any) -> dict[str, Any]:
    """An ``IngestReport`` as answered to clients."""
    out = report.to_dict()
    for verdict in out["accepted"] + out["rejected"]:
        verdict.pop("path", None)  # where we keep files is our business
    return out


@api.post("/uploads")
@api.auth_required(token_auth)
@api.output(schemas.UploadReport, status_code=201, headers={
    "Location": location_header("The upload's record")})
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


def require_json_or_nothing() -> None:
    """A JSON body, or none at all (defaults). Anything else is a 415: the JSON parser reads a
    non-JSON body as "no parameters", which would start a job the client did not describe."""
    if request.is_json:
        return
    if request.content_length == 0:
        return
    if request.content_length is None and not request.stream.read(1):
        return  # chunked (no Content-Length) and nothing in it
    raise api_error(415, "unsupported_media_type",
                    f"Send the parameters as JSON (Content-Type: application/json), or no "
                    f"body at all for the defaults; not {request.mimetype or 'untyped bytes'}.")


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
    "Location": location_header("Poll this job")})
@api.doc(responses={
    200: "A job was already queued or running: that job (created = false)",
    400: "The body is not valid JSON", 409: "Nothing a retrain could use yet (see `plan`)",
    415: "A body that is not JSON", 422: "Bad parameters",
    503: "The broker or the database is unavailable"})
def retrain(body: dict):
    """Start a retraining job.

    Fine-tune the served model on the uploads not used yet; poll the ``Location``. Only one
    job runs at a time: asking again returns the running job with status 200."""
    params = {k: v for k, v in body.items() if v is not None}
    require_json_or_nothing()
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
    404: "No such version (or not a valid version name)",
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
        "inference_precision": predictor.precision,  # what its conv body runs in here
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
    pointer = st.predictors.pointer
    if pointer is not None and not pointer.ok:  # serving, but not what the pointer names
        checks["model"] = {"ok": False, "message": pointer.message}
    for name, error in (("database", services.database_error(st.settings)),
                        ("broker", services.broker_error(st.settings))):
        checks[name] = {"ok": error is None, "message": error or "reachable"}
    return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}


@api.get("/ready")
@api.output(schemas.ReadyOut)
@api.doc(responses={503: "Not ready: the failing checks are listed"})
def ready():
    """Readiness.

    200 when a model is loaded, it is the version the registry's pointer names (sha256
    verified), and the database and broker answer; 503 otherwise, with the reason ("pointer
    unreadable", "hash mismatch", "serving an older version than the pointer names", ...): a
    load balancer should stop sending traffic here, an operator should look."""
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

    return render_template("api_docs.html", spec=cast(APIFlask, current_app).spec)


def register_prometheus(app: APIFlask) -> None:
    @app.get("/metrics")
    @app.doc(summary="Prometheus metrics", tags=["Operations"], responses={  # type: ignore[arg-type]
        200: {"description": "Prometheus text format, all workers merged",
              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def prometheus_metrics():
        """Prometheus text exposition, merged across all gunicorn workers."""
        body, content_type = services.state().monitor.prometheus_text()
        return Response(body, content_type=content_type)
