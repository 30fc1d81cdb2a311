"""The pages (``/``): predict, data, training, dashboard, login.

Server-rendered and usable without JavaScript; ``static/app.js`` adds only what needs it
(microphone recording, folder upload with relative paths, live job progress and training
curves, in-place "Wrong? It was ..." corrections, the footer's served model kept current).
Views reuse the API module's functions, so a page and its API endpoint cannot disagree.
Anything that changes state needs an admin session and a CSRF token.

The pages say what is true, not what was hoped: the Training page shows what a retrain would
use (``jobs.retrain_plan``) before its button, and disables it when a job could only fail; the
job page's live status, not the button's flash, says whether a retrain worked.
"""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path
from typing import Any

from apiflask import HTTPError
from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from markupsafe import Markup, escape

from src import jobs
from src.errors import UserError
from src.preprocessing import CLASSES

from . import api as api_views
from . import plots, services
from .security import admin_required, check_admin_secret, is_admin, safe_next

log = logging.getLogger(__name__)
ui = Blueprint("ui", __name__)
PLAYER_MAX_BYTES = 3 << 20  # larger clips are classified but not echoed back into the page


@ui.app_context_processor
def _globals() -> dict[str, Any]:
    predictor = services.state().predictor()  # loaded once per process (gunicorn: at boot)
    return {"admin": is_admin(), "served_version": predictor.version if predictor else None,
            "classes": CLASSES}


@ui.app_template_filter("duration")
def duration(seconds: float) -> str:
    """``75`` → ``"75 s"``, ``200`` → ``"4 min"`` (the ETA; app.js words it the same way)."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{round(seconds)} s"
    return f"{-(-seconds // 60):.0f} min"


# What a view turns into a page: the API helpers' HTTP errors and the core's UserErrors.
PageError = (HTTPError, UserError)


def _error_of(exc: HTTPError | UserError) -> tuple[str, str]:
    if isinstance(exc, UserError):
        return exc.code, exc.message
    data = dict(exc.extra_data or {})
    return data.get("code", "error"), exc.message or "Something went wrong."


def _status_of(exc: HTTPError | UserError) -> int:
    return exc.status if isinstance(exc, UserError) else exc.status_code


# --------------------------------------------------------------------------- predict

def _audio_mime(data: bytes) -> str:
    head = data[:12]
    if head[:4] == b"fLaC":
        return "audio/flac"
    if head[:4] == b"OggS":
        return "audio/ogg"
    if head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    return "audio/wav"


@ui.get("/")
def index():
    return render_template("predict.html", active="predict", result=None)


@ui.post("/predict")
def predict_page():
    """Classify the chosen (or recorded) clip and show the answer with its spectrogram."""
    st = services.state()
    try:
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise HTTPError(400, "Choose an audio file (or record one) first.",
                            extra_data={"code": "missing_file"})
        limit = st.settings.max_clip_mb << 20
        data = upload.stream.read(limit + 1)
        if len(data) > limit:
            raise HTTPError(413, f"A clip may be at most {st.settings.max_clip_mb} MiB.",
                            extra_data={"code": "too_large"})
        if not data:
            raise HTTPError(400, "The file is empty.", extra_data={"code": "empty"})
        prediction, predictor, latency, waveform = api_views.run_prediction(data, 10)
    except PageError as exc:
        code, message = _error_of(exc)
        return render_template("predict.html", active="predict", result=None,
                               error=message, error_code=code), _status_of(exc)
    config = predictor.config
    image = plots.spectrogram_png(predictor.logmel(waveform), config.sample_rate,
                                  config.hop_length)
    from werkzeug.utils import secure_filename

    filename = secure_filename(upload.filename or "") or "recording.wav"
    try:  # kept for an hour, so "Wrong? It was ..." can turn it into training data
        prediction_id = api_views.keep_clip(data, filename)
    except Exception as exc:  # the answer stands without the feedback form
        log.warning("could not keep the clip for feedback: %s", exc)
        prediction_id = None
    result = {
        **prediction.to_dict(),
        "prediction_id": prediction_id,
        "latency_ms": round(1000 * latency, 1),
        "file": filename,
        "ranked": sorted(prediction.probabilities.items(), key=lambda kv: kv[1], reverse=True),
        "spectrogram": "data:image/png;base64," + base64.b64encode(image).decode(),
        "spectrogram_title": plots.spectrogram_title(config.frontend),
        "audio": (f"data:{_audio_mime(data)};base64," + base64.b64encode(data).decode())
        if len(data) <= PLAYER_MAX_BYTES else None,
    }
    return render_template("predict.html", active="predict", result=result)


def feedback_outcome(report: dict[str, Any], label: str) -> dict[str, Any]:
    """The upload report of one fed-back clip, in the words the page shows."""
    if report.get("n_accepted"):
        return {"accepted": True, "label": label, "code": "accepted",
                "message": "Saved as training data for the next retrain."}
    rejected = (report.get("rejected") or [{}])[0]
    return {"accepted": False, "label": label, "code": rejected.get("code") or "rejected",
            "message": rejected.get("message") or "The clip was not accepted."}


@ui.post("/predict/feedback")
@admin_required
def feedback_page():
    """"Wrong? It was ...": the kept clip becomes a labelled upload (same checks as any)."""
    partial = request.headers.get("X-Requested-With") == "fetch"
    prediction_id = (request.form.get("prediction_id") or "").strip()
    label = (request.form.get("label") or "").strip()
    status = 200
    try:
        if not prediction_id:
            raise HTTPError(400, "No prediction to correct: classify a clip first.",
                            extra_data={"code": "missing_prediction"})
        if label not in CLASSES:
            raise HTTPError(400, "Choose one of the ten classes.",
                            extra_data={"code": "bad_label"})
        report = api_views.store_feedback(prediction_id, label, "ui:admin")
        outcome = feedback_outcome(report, label)
        if outcome["accepted"]:
            status = 201
    except PageError as exc:
        code, message = _error_of(exc)
        outcome = {"accepted": False, "label": label, "code": code, "message": message}
        status = _status_of(exc)
    if partial:  # app.js puts the verdict under the prediction it corrects
        return render_template("_feedback_report.html", feedback=outcome), status, \
            {"X-Partial": "1"}
    return render_template("predict.html", active="predict", result=None,
                           feedback=outcome), status


# --------------------------------------------------------------------------- analyse

@ui.get("/analyse")
def analyse_page():
    return render_template("analyse.html", active="analyse", job=None, result=None)


@ui.post("/analyse")
def analyse_upload():
    """Store the recording (the page plays stretches of it back) and analyse it now when it
    is short, else queue a worker job; either way, show its page."""
    st = services.state()
    try:
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise HTTPError(400, "Choose a recording first.", extra_data={"code": "missing_file"})
        params = analysis_form_params()
        stream, name = api_views.read_recording(st.settings)
        try:
            job, _ = api_views.analyze_recording(stream, name or "recording", params,
                                                 keep_audio=True)
        finally:
            stream.close()
    except PageError as exc:
        code, message = _error_of(exc)
        return render_template("analyse.html", active="analyse", job=None, result=None,
                               error=message, error_code=code), _status_of(exc)
    return redirect(url_for("ui.analysis_page", job_id=job["id"]))


def analysis_form_params() -> dict[str, float]:
    """The form's optional window, hop and threshold (blank: the settings'); the analysis
    judges the values (422 with the reason), the form only has to be numbers."""
    params: dict[str, float] = {}
    for key in ("window_s", "hop_s", "min_confidence"):
        text = (request.form.get(key) or "").strip()
        if text:
            try:
                params[key] = float(text)
            except ValueError:
                raise HTTPError(400, f"{key.replace('_', ' ')} must be a number, not {text!r}.",
                                extra_data={"code": "bad_number"}) from None
    return params


def _analysis_job(job_id: str) -> dict[str, Any]:
    from src import analysis_jobs

    try:
        return analysis_jobs.get(job_id, services.state().settings)
    except analysis_jobs.AnalysisJobNotFound:
        abort(404)


@ui.get("/analyse/<job_id>")
def analysis_page(job_id: str):
    from .analysis_plots import colour_index

    job = _analysis_job(job_id)
    result = job.get("result")
    if result:
        result["ranked"] = sorted(((k, v) for k, v in result["summary"].items() if v > 0),
                                  key=lambda kv: kv[1], reverse=True)
        for event in result["events"]:
            event["colour"] = colour_index(event["label"])
    return render_template("analyse.html", active="analyse", job=job, result=result)


@ui.get("/analyse/<job_id>/audio")
def analysis_audio(job_id: str):
    """The recording, with range requests (the player seeks to an event)."""
    from src import analysis_jobs

    try:
        path = analysis_jobs.audio_path(job_id, services.state().settings)
    except analysis_jobs.AnalysisJobNotFound:
        abort(404)
    with open(path, "rb") as f:
        mime = _audio_mime(f.read(12))
    return send_file(path, mimetype=mime, conditional=True, max_age=0)


@ui.get("/analyse/<job_id>/<kind>.png")
def analysis_png(job_id: str, kind: str):
    from . import analysis_plots

    draw = {"timeline": analysis_plots.timeline_png, "summary": analysis_plots.summary_png}
    result = _analysis_job(job_id).get("result")
    if kind not in draw or not result:
        abort(404)
    return Response(draw[kind](result), mimetype="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})


# --------------------------------------------------------------------------- data

_visual_threads: dict[str, threading.Thread] = {}  # data folder → its renderer
_visual_errors: dict[str, str] = {}
_visual_lock = threading.Lock()


def _data_root() -> Path:
    return Path(services.state().settings.data_dir)


def visuals_state() -> tuple[list | None, str | None]:
    """``(visuals, None)`` when rendered; ``(None, None)`` while rendering in the background
    (started here on first need); ``(None, error)`` when there is no usable data set."""
    from src import visualise

    settings = services.state().settings
    root = _data_root()
    if not root.is_dir():
        return None, (f"No data set at {root}. Create the demo set with `urbansound data synth` "
                      "or import UrbanSound8K with `urbansound data import DIR`.")
    done = visualise.cached(root, settings.cache_dir)
    if done is not None:
        return done, None
    key = str(root.resolve())
    with _visual_lock:
        if key in _visual_errors:
            return None, _visual_errors[key]
        thread = _visual_threads.get(key)
        if thread is None or not thread.is_alive():
            def work() -> None:
                try:
                    visualise.render_all(root, settings.cache_dir)
                except Exception as exc:  # shown on the page; retried when the data changes
                    # an empty or unreadable data folder is the user's state (a fresh clone's
                    # data/ holds only its README), not the server's fault
                    log.log(logging.INFO if isinstance(exc, UserError) else logging.WARNING,
                            "data set visualisations failed: %s", exc)
                    with _visual_lock:
                        _visual_errors[key] = str(exc)

            # Not a daemon: torch must not be torn down under a running render at exit
            # (the interpreter would abort); shutdown waits for the render instead.
            thread = threading.Thread(target=work, name="visualise", daemon=False)
            _visual_threads[key] = thread
            thread.start()
    return None, None


@ui.get("/data")
def data_page():
    visuals, visuals_error = visuals_state()
    stats, db_error = None, None
    uploads: list[dict[str, Any]] = []
    try:
        stats = services.upload_stats()
        uploads, _ = services.list_uploads(10, 0)
    except UserError as exc:  # database down: the page still shows the visualisations
        db_error = exc.message
    return render_template("data.html", active="data", visuals=visuals,
                           visuals_error=visuals_error, data_root=str(_data_root()),
                           stats=stats, uploads=uploads, db_error=db_error, classes=CLASSES)


@ui.get("/data/visuals/status")
def visuals_status():
    visuals, error = visuals_state()
    return jsonify({"ready": visuals is not None, "error": error})


@ui.get("/data/visuals/<name>.png")
def visual_png(name: str):
    visuals, _ = visuals_state()
    for v in visuals or []:
        if v.name == name:
            return send_file(v.png, mimetype="image/png", max_age=300)
    abort(404)


@ui.post("/data/upload")
@admin_required
def upload_page():
    """Bulk upload from the page: a folder (``webkitdirectory``), many files, or a zip."""
    partial = request.headers.get("X-Requested-With") == "fetch"
    try:
        report = api_views.ingest_request("ui", "ui:admin")
    except PageError as exc:
        _, message = _error_of(exc)
        if partial:
            return render_template("_upload_report.html", report=None, error=message), \
                _status_of(exc), {"X-Partial": "1"}
        flash(message, "error")
        return redirect(url_for("ui.data_page"))
    try:
        totals = services.upload_stats()
        recent, _ = services.list_uploads(10, 0)
    except UserError:  # database gone since: the report stands without the totals
        totals, recent = None, []
    if partial:  # app.js inserts the report and refreshes the "uploaded so far" box
        return render_template("_upload_report.html", report=report, error=None,
                               totals=totals, recent=recent, partial=True), 200, \
            {"X-Partial": "1"}
    return render_template("upload_report.html", active="data", report=report, totals=totals)


# --------------------------------------------------------------------------- training

@ui.get("/training")
def training_page():
    recent, jobs_error = [], None
    try:
        recent = jobs.list_jobs(15)
    except UserError as exc:  # database down: versions and the rest still show
        jobs_error = exc.message
    plan, plan_error = retrain_plan()
    versions = [api_views.version_out(v) for v in api_views.list_versions()]
    active_job = next((j for j in recent if not j["done"]), None)
    return render_template("training.html", active="training", jobs=recent,
                           jobs_error=jobs_error, versions=versions, active_job=active_job,
                           plan=plan, plan_error=plan_error)


def retrain_plan() -> tuple[dict[str, Any] | None, str | None]:
    """``(plan, None)``: what a retrain would use now; ``(None, error)`` when that cannot be
    told (the database is down, say)."""
    try:
        return jobs.retrain_plan(services.state().settings), None
    except UserError as exc:
        return None, exc.message


def plan_blocker(plan: dict[str, Any]) -> str:
    """One sentence naming what is missing and how to fix it."""
    parts = [f"{m.get('what')} (fix: {m.get('fix')})".replace("`", "")
             for m in plan.get("missing") or []]
    return "A retrain cannot run yet: " + ("; ".join(parts) or plan.get("summary") or
                                            "the data it needs is missing") + "."


@ui.app_template_filter("backticks")
def backticks(text: str) -> Markup:
    """``"run `urbansound data synth`"`` → escaped text with the command in ``<code>``."""
    parts = str(text or "").split("`")
    return Markup("").join(Markup("<code>{}</code>").format(p) if i % 2 else escape(p)
                           for i, p in enumerate(parts))


@ui.post("/training/retrain")
@admin_required
def retrain_page():
    try:  # the same rule as the API's, from the one place that knows it
        params = jobs.validate_params({"epochs": (request.form.get("epochs") or "").strip()
                                       or None})
        job, created = api_views.start_retrain("ui:admin", params)
    except jobs.RetrainNotReady as exc:  # refused before any job exists: it could only fail
        flash(plan_blocker(exc.plan), "error")
        return redirect(url_for("ui.training_page"))
    except PageError as exc:
        flash(_error_of(exc)[1], "error")
        return redirect(url_for("ui.training_page"))
    # Not "started": the job page's live status is the truth (it may still fail).
    flash("Retrain queued: its live state is below." if created
          else "A retrain is already in progress: showing it.", "info")
    return redirect(url_for("ui.job_page", job_id=job["id"]))


@ui.get("/training/jobs/<job_id>")
def job_page(job_id: str):
    job = jobs.get_job(job_id)
    if job is None:
        abort(404)
    return render_template("job.html", active="training", job=job)


@ui.get("/training/models/<version>")
def version_page(version: str):
    info = next((v for v in api_views.list_versions() if v.version == version), None)
    if info is None:
        abort(404)
    return render_template("version.html", active="training", v=info,
                           has_cm=bool(info.metrics.get("confusion_matrix")))


@ui.get("/training/models/<version>/confusion.png")
def confusion_png(version: str):
    from src import registry

    st = services.state()
    try:
        meta = registry.read_metadata(registry.version_path(version, st.settings.models_dir))
    except registry.RegistryError:
        abort(404)
    metrics = meta.get("metrics") or {}
    if not metrics.get("confusion_matrix"):
        abort(404)
    path = plots.confusion_png(metrics, st.settings.cache_dir / "plots", version)
    return send_file(path, mimetype="image/png", max_age=86400)


@ui.post("/training/models/<version>/activate")
@admin_required
def activate_page(version: str):
    try:
        result = api_views.activate_version(version, force=request.form.get("force") == "1")
    except PageError as exc:
        flash(_error_of(exc)[1], "error")
    else:
        flash(f"Now serving {result['version']} (was {result['previous'] or 'nothing'}).",
              "success")
    return redirect(url_for("ui.training_page"))


# --------------------------------------------------------------------------- dashboard

@ui.get("/dashboard")
def dashboard_page():
    health = api_views.health_data()
    summary = api_views.metrics_summary()
    return render_template("dashboard.html", active="dashboard", health=health, m=summary,
                           plots=plots.DASHBOARD_PLOTS)


@ui.get("/dashboard/plots/<name>.png")
def dashboard_plot(name: str):
    if name not in plots.DASHBOARD_PLOTS:
        abort(404)
    image = plots.DASHBOARD_PLOTS[name][1](api_views.metrics_summary())
    return Response(image, mimetype="image/png", headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- login

@ui.route("/login", methods=["GET", "POST"])
def login():
    target = safe_next(request.values.get("next"))
    if request.method == "POST":
        if check_admin_secret(request.form.get("password", "")):
            session.clear()
            session["admin"] = True
            session.permanent = True
            flash("Logged in as administrator.", "success")
            return redirect(target)
        flash("Wrong password.", "error")
        return render_template("login.html", active=None, next=target), 401
    return render_template("login.html", active=None, next=target)


@ui.post("/logout")
def logout():
    session.clear()
    flash("Logged out.", "info")
    return redirect(url_for("ui.index"))
