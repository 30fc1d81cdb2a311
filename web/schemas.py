"""marshmallow schemas of the REST API: they validate input and generate the OpenAPI document,
so the document cannot drift from what the code accepts and returns."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import Boolean, Dict, Float, Integer, List, Nested, String
from apiflask.validators import OneOf, Range

from src.preprocessing import CLASSES

JOB_STATUSES = ("queued", "running", "succeeded", "rejected", "failed")


# --------------------------------------------------------------------------- inputs

class BatchQuery(Schema):
    top_k = Integer(load_default=3, validate=Range(1, 10),
                    metadata={"description": "How many of the best classes to list."})


class TopKQuery(BatchQuery):
    keep = Boolean(load_default=False, metadata={
        "description": "Keep the clip for an hour and return a prediction_id, so a wrong "
        "answer can be corrected into training data (POST /predictions/<id>/feedback)."})


class AnalyzeQuery(Schema):
    window_s = Float(validate=Range(0.5, 60), metadata={
        "description": "Window length in seconds (default URBANSOUND_ANALYZE_WINDOW_S, 4); at "
        "most what the model hears (its clip length)."})
    hop_s = Float(validate=Range(0.25, 60), metadata={
        "description": "Step between windows in seconds (default URBANSOUND_ANALYZE_HOP_S, "
        "2); at most the window."})
    min_confidence = Float(validate=Range(0.0, 1.0), metadata={
        "description": "Below this mean probability a stretch is `uncertain`, not an event "
        "(default URBANSOUND_ANALYZE_MIN_CONFIDENCE, 0.5)."})


class FeedbackIn(Schema):
    label = String(required=True, validate=OneOf(CLASSES), metadata={
        "description": "What the clip really is."})


class PageQuery(Schema):
    limit = Integer(load_default=50, validate=Range(1, 500))
    offset = Integer(load_default=0, validate=Range(0, 10**9))


class LimitQuery(Schema):
    limit = Integer(load_default=20, validate=Range(1, 200))


class ActivateQuery(Schema):
    force = Boolean(load_default=False, metadata={
        "description": "Also activate a version the quality gate rejected."})


class RetrainIn(Schema):
    epochs = Integer(validate=Range(1, 200), metadata={
        "description": "Fine-tuning epochs (default: URBANSOUND_RETRAIN_EPOCHS)."})
    lr = Float(validate=Range(1e-6, 1.0), metadata={
        "description": "Peak learning rate (default: URBANSOUND_RETRAIN_LR)."})


# --------------------------------------------------------------------------- prediction

class TopK(Schema):
    label = String(required=True)
    probability = Float(required=True)


class PredictionOut(Schema):
    label = String(required=True, validate=OneOf(CLASSES))
    class_id = Integer(required=True)
    confidence = Float(required=True)
    probabilities = Dict(keys=String(), values=Float(), required=True)
    top_k = List(Nested(TopK), required=True)
    model_version = String(required=True, metadata={"description": "The model that answered."})
    latency_ms = Float(required=True, metadata={
        "description": "Server-side time to decode the clip and run the model."})
    duration_s = Float(allow_none=True, metadata={
        "description": "The file's length (by its header); null when it does not say."})
    analysed_s = Float(allow_none=True, metadata={
        "description": "How much of it the answer heard: the first clip (4 s). Longer files: "
        "POST /analyze for the whole of it."})
    file = String(allow_none=True, metadata={"description": "The sanitised file name, if any."})
    prediction_id = String(metadata={
        "description": "With ?keep=true: the id to correct this prediction with."})


class ErrorDetail(Schema):
    code = String(required=True, metadata={"description": "Stable machine-readable code."})
    message = String(required=True, metadata={"description": "What went wrong, for people."})


class BatchResult(Schema):
    """One file of a batch: the prediction's fields (as ``/predict`` answers them), or
    ``file`` and ``error`` when this file could not be classified."""

    file = String(allow_none=True, metadata={"description": "The sanitised file name, if any."})
    label = String(validate=OneOf(CLASSES))
    class_id = Integer()
    confidence = Float()
    probabilities = Dict(keys=String(), values=Float())
    top_k = List(Nested(TopK))
    model_version = String()
    latency_ms = Float()
    duration_s = Float(allow_none=True)
    analysed_s = Float(allow_none=True)
    error = Nested(ErrorDetail, metadata={
        "description": "Present instead of the prediction when this file failed."})


class BatchPredictionOut(Schema):
    model_version = String(required=True, metadata={
        "description": "The one model version that answered every file of the batch."})
    n_files = Integer(required=True)
    n_ok = Integer(required=True)
    n_failed = Integer(required=True)
    results = List(Nested(BatchResult), required=True, metadata={
        "description": "One result per file, in the order the files were sent."})


# --------------------------------------------------------------------------- analyses

ANALYSIS_LABELS = (*CLASSES, "uncertain", "silence")
ANALYSIS_STATUSES = ("queued", "running", "succeeded", "failed")


class AnalysisWindow(Schema):
    start_s = Float(required=True)
    end_s = Float(required=True)
    label = String(required=True, validate=OneOf(ANALYSIS_LABELS), metadata={
        "description": "The window's top class (what /predict answers for it), or `silence` "
        "(quieter than URBANSOUND_ANALYZE_SILENCE_DBFS: not classified)."})
    confidence = Float(required=True)
    probabilities = Dict(keys=String(), values=Float(), allow_none=True, required=True)
    level_dbfs = Float(required=True)


class AnalysisEvent(Schema):
    label = String(required=True, validate=OneOf(CLASSES))
    start_s = Float(required=True)
    end_s = Float(required=True)
    confidence = Float(required=True, metadata={
        "description": "Mean probability of the label over the event."})


class AnalysisOut(Schema):
    """A whole recording: windows, events and seconds per class."""

    file = String(allow_none=True)
    duration_s = Float(required=True, metadata={"description": "Audio actually read."})
    analysed_s = Float(required=True)
    header_duration_s = Float(allow_none=True, metadata={
        "description": "What the file's header claims (more than duration_s: truncated)."})
    sample_rate = Integer(required=True)
    channels = Integer(required=True)
    model_version = String(required=True)
    window_s = Float(required=True)
    hop_s = Float(required=True)
    min_confidence = Float(required=True)
    windows = List(Nested(AnalysisWindow), required=True)
    events = List(Nested(AnalysisEvent), required=True)
    summary = Dict(keys=String(), values=Float(), required=True, metadata={
        "description": "Seconds per class, plus `uncertain` and `silence`; they add up to "
        "duration_s."})
    warnings = List(String(), required=True)
    latency_ms = Float(metadata={"description": "Server-side time (answered at once only)."})


class AnalysisJob(Schema):
    """A long recording analysed by a worker; ``result`` once it succeeded."""

    id = String(required=True)
    status = String(required=True, validate=OneOf(ANALYSIS_STATUSES))
    done = Boolean(required=True)
    file = String(allow_none=True)
    params = Dict(allow_none=True)
    requested_at = String(allow_none=True)
    started_at = String(allow_none=True)
    finished_at = String(allow_none=True)
    progress = Dict(allow_none=True, metadata={
        "description": "done_s and total_s: seconds of the recording analysed so far."})
    error = String(allow_none=True)
    result = Nested(AnalysisOut, allow_none=True)


# --------------------------------------------------------------------------- uploads

class FileVerdict(Schema):
    name = String(required=True)
    accepted = Boolean(required=True)
    code = String(required=True, metadata={"description": "Empty when accepted."})
    message = String(required=True)
    label = String(allow_none=True)
    sha256 = String(allow_none=True)
    size_bytes = Integer(allow_none=True)
    duration_s = Float(allow_none=True)
    sample_rate = Integer(allow_none=True)
    channels = Integer(allow_none=True)
    format = String(allow_none=True)
    clip_id = Integer(allow_none=True)


class UploadReport(Schema):
    upload_id = Integer(allow_none=True)
    source = String(required=True)
    client = String(required=True)
    n_files = Integer(required=True)
    n_accepted = Integer(required=True)
    n_rejected = Integer(required=True)
    accepted = List(Nested(FileVerdict), required=True)
    rejected = List(Nested(FileVerdict), required=True)
    skipped = List(String(), required=True)


class UploadSummary(Schema):
    id = Integer(required=True)
    created_at = String(allow_none=True)
    source = String(required=True)
    client = String(required=True)
    n_files = Integer(required=True)
    n_accepted = Integer(required=True)
    n_rejected = Integer(required=True)


class UploadList(Schema):
    items = List(Nested(UploadSummary), required=True)
    total = Integer(required=True)
    limit = Integer(required=True)
    offset = Integer(required=True)
    stats = Dict(required=True, metadata={"description": "Clips per class, unused clips..."})


class StoredClip(Schema):
    clip_id = Integer(required=True)
    name = String(required=True)
    label = String(required=True)
    sha256 = String(required=True)
    duration_s = Float(required=True)
    sample_rate = Integer(required=True)
    channels = Integer(required=True)
    size_bytes = Integer(required=True)
    used_in_job_id = String(allow_none=True)
    role = String(allow_none=True, metadata={
        "description": "train, or test: held out as the quality gate's test set (no data set "
        "installed); unset until a retrain decides."})


class RejectedFile(Schema):
    name = String(required=True)
    code = String(required=True)
    message = String(required=True)


class UploadDetail(UploadSummary):
    accepted = List(Nested(StoredClip), required=True)
    rejected = List(Nested(RejectedFile), required=True)


# --------------------------------------------------------------------------- jobs

class JobOut(Schema):
    """A retraining job. ``progress`` holds epoch, epochs, loss and val_f1 while it runs;
    ``message`` says promoted or rejected, and why, once it is done."""

    id = String(required=True)
    status = String(required=True, validate=OneOf(JOB_STATUSES))
    requested_at = String(allow_none=True)
    requested_by = String(allow_none=True)
    started_at = String(allow_none=True)
    finished_at = String(allow_none=True)
    progress = Dict(allow_none=True)
    params = Dict(allow_none=True)
    base_version = String(allow_none=True)
    result_version = String(allow_none=True)
    metrics = Dict(allow_none=True)
    n_new_clips = Integer(allow_none=True)
    message = String(allow_none=True)
    error = String(allow_none=True)
    promoted = Boolean(allow_none=True)
    done = Boolean(required=True)
    heartbeat_at = String(allow_none=True)
    duration_s = Float(allow_none=True)
    worker = String(allow_none=True)
    celery_task_id = String(allow_none=True)


class JobDetail(JobOut):
    """One job as ``GET /jobs/<id>`` returns it (its own name in the OpenAPI document, so the
    nested ``JobOut`` of other responses is not registered twice)."""


class RetrainOut(Schema):
    created = Boolean(required=True, metadata={
        "description": "False when a job was already queued or running: that job is returned."})
    job = Nested(JobOut, required=True)


class JobList(Schema):
    items = List(Nested(JobOut), required=True)


class PlanMissing(Schema):
    what = String(required=True)
    fix = String(required=True, metadata={"description": "The command or action that fixes it."})


class PlanTestSet(Schema):
    kind = String(required=True, validate=OneOf(["folds", "folder", "uploads"]))
    description = String(required=True)
    n = Integer(required=True)


class PlanCount(Schema):
    n = Integer(required=True)
    description = String(required=True)


class RetrainPlan(Schema):
    """What a retrain would use now, or what is missing before one can run."""

    ready = Boolean(required=True, metadata={
        "description": "False: POST /retrain would be refused (409) until `missing` is fixed."})
    served_version = String(allow_none=True)
    base = Nested(PlanCount, required=True)
    new_uploads = Integer(required=True)
    test_set = Nested(PlanTestSet, allow_none=True)
    missing = List(Nested(PlanMissing), required=True)
    summary = String(required=True)


# --------------------------------------------------------------------------- models

class VersionOut(Schema):
    version = String(required=True)
    status = String(required=True)
    active = Boolean(required=True)
    parent = String(allow_none=True)
    created_at = String(allow_none=True)
    activated_at = String(allow_none=True)
    metrics = Dict(required=True)
    data = Dict(required=True)
    reason = String(allow_none=True)
    error = String(allow_none=True)


class ModelList(Schema):
    served = String(allow_none=True)
    items = List(Nested(VersionOut), required=True)


class ActivateOut(Schema):
    version = String(required=True)
    previous = String(allow_none=True)
    serving = String(allow_none=True, metadata={
        "description": "What this process serves after the swap; other workers follow "
                       "within URBANSOUND_MODEL_POLL_S."})


# --------------------------------------------------------------------------- operations

class HealthOut(Schema):
    status = String(required=True)
    uptime_s = Float(allow_none=True, metadata={"description": "Since the server started."})
    process_uptime_s = Float(required=True)
    model_version = String(allow_none=True)
    model_loaded = Boolean(required=True)
    model_activated_at = String(allow_none=True)
    model_uptime_s = Float(allow_none=True, metadata={
        "description": "Since the served version was activated."})
    version = String(required=True, metadata={"description": "The urbansound package version."})


class Check(Schema):
    ok = Boolean(required=True)
    message = String(required=True)


class ReadyOut(Schema):
    ready = Boolean(required=True)
    checks = Dict(keys=String(), values=Nested(Check), required=True)


class MetricsOut(Schema):
    uptime_s = Float(allow_none=True)
    requests = Dict(required=True)
    error_rate = Float(required=True)
    client_error_rate = Float(required=True)
    latency_ms = Dict(required=True)
    predictions = Dict(required=True)
    confidence = Dict(required=True)
    workers_per_version = Dict(required=True)
    model = Dict(required=True)
    drift = Dict(required=True)

