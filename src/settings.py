"""One settings object for the whole system, read from the environment.

Every knob lives here with its default so that the CLI, the web app and the worker agree,
and so that the README's configuration table can be generated from one place. Variables are
prefixed ``URBANSOUND_`` (``URBANSOUND_DATABASE_URL``...). Paths are relative to the working
directory at the moment the settings are loaded, and resolved to absolute paths right then:
nothing downstream may resolve a path against anything else (Flask's ``send_file``, for one,
resolves relative paths against the ``web`` package, which once broke every chart image). The
embedded default keeps all mutable state under ``var/``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: what serving's conv body runs in; ``auto``: bfloat16 where the CPU has native kernels
Precision = Literal["auto", "float32", "bfloat16"]


class Settings(BaseSettings):
    """Defaults describe the embedded set-up: SQLite and a SQLAlchemy broker under ``var/``."""

    model_config = SettingsConfigDict(env_prefix="URBANSOUND_", env_file=None, extra="ignore")

    state_dir: Path = Field(Path("var"), description="Mutable state: database, caches, uploads.")
    data_dir: Path = Field(Path("data"), description="Training/test data (class-per-folder).")
    models_dir: Path = Field(Path("models"), description="Model registry: versions + pointer.")
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite in state_dir.")
    broker_url: str = Field("", description="Celery broker; empty = SQLAlchemy on SQLite.")
    result_backend: str = Field("", description="Celery results; empty = SQLite in state_dir.")

    api_token: str = Field("change-me", description="Bearer token for mutating API calls.")
    admin_password: str = Field("change-me", description="Password for the UI's admin login.")
    secret_key: str = Field("dev-secret-change-me", description="Flask session/CSRF key.")
    allow_default_secrets: bool = Field(
        False, description="Start on a non-loopback address even with a default or placeholder "
        "secret (a warning instead of a refusal; for throw-away trials only).")

    rate_limits: bool = Field(True, description="Rate limits and lock-out on (429 + Retry-After).")
    rate_limit_auth_failures: str = Field(
        "10/minute", description="Wrong tokens/passwords per client address; past it, that "
        "address gets 429 until the window passes (missing credentials do not count).")
    rate_limit_mutating: str = Field(
        "60/minute", description="Uploads, retrains, activations, feedback: calls per client "
        "address and endpoint (predictions and reads are not limited).")
    rate_limit_storage: str = Field(
        "", description="Rate-limit counters (a `limits` storage URI); empty = the broker's "
        "Redis when it is redis://, else memory:// (per process).")

    max_upload_mb: int = Field(200, description="Largest request body (bulk uploads), MiB.")
    max_clip_mb: int = Field(20, description="Largest single audio file, MiB.")
    max_batch_files: int = Field(64, ge=1, description="Most clips in one batch prediction "
                                 "request (POST /api/v1/predict/batch).")
    max_archive_members: int = Field(5000, description="Most files in one zip upload.")
    max_archive_bytes_mb: int = Field(1024, description="Most bytes decompressed from one zip.")
    min_clip_seconds: float = Field(0.05, description="Shorter clips are rejected.")
    max_clip_seconds: float = Field(60.0, description="Longer uploads are rejected.")

    analyze_window_s: float = Field(4.0, description="Window of `analyze` (seconds): at most "
                                    "the model's clip length.")
    analyze_hop_s: float = Field(2.0, description="Step between analysis windows (seconds).")
    analyze_min_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="Stretches whose best class is less probable are "
        "`uncertain` in an analysis timeline.")
    analyze_silence_dbfs: float = Field(-80.0, description="Analysis windows quieter than "
                                        "this (RMS dBFS) are `silence`, not classified.")
    analyze_batch_size: int = Field(16, ge=1, description="Analysis windows per model call.")
    analyze_max_seconds: float = Field(86400.0, gt=0, description="Longest stretch of one "
                                       "recording analysed (the rest is reported unheard).")
    max_analyze_mb: int = Field(200, ge=1, description="Largest recording POST "
                                "/api/v1/analyze and the Analyse page accept, MiB.")
    analyze_sync_max_s: float = Field(120.0, ge=0, description="Recordings up to this long "
                                      "are analysed in the request; longer ones become a job.")
    analysis_keep_s: float = Field(3600.0, gt=0, description="How long an analysis job's "
                                   "result (and, from the page, its recording) is kept (s).")

    retrain_epochs: int = Field(8, description="Fine-tuning epochs per retrain job.")
    retrain_lr: float = Field(3e-4, description="Peak learning rate when fine-tuning.")
    gate_margin: float = Field(0.01, description="Promote if new macro-F1 >= served - margin.")
    gate_min_test_clips: int = Field(
        30, ge=1, description="A retrain runs only when the gate's test set has at least this "
        "many clips: on fewer, a candidate that lost ground on unseen recordings passes "
        "whenever it keeps those few right.")
    retrain_soft_limit_s: int = Field(3300, description="Celery soft time limit of a retrain.")
    retrain_hard_limit_s: int = Field(3600, description="Celery hard time limit of a retrain.")
    retrain_base_clips: int = Field(
        1500, description="Base training clips mixed into a retrain (fixed-seed sample; 0 = all).")
    job_heartbeat_s: float = Field(10.0, description="How often a running retrain touches its "
                                   "heartbeat.")
    job_stale_after_s: float = Field(120.0, description="A running job silent this long is "
                                     "marked failed (worker died).")
    job_queue_timeout_s: float = Field(900.0, description="A queued job no worker took this "
                                       "long is marked failed.")
    broker_timeout_s: float = Field(3.0, description="Broker connect timeout when queuing a job "
                                    "(Redis down fails fast).")

    cpu_cores: int = Field(0, description="Cores this server may use (a replica's share, a "
                           "container's limit); 0 = CPU affinity and cgroup quota.")
    torch_threads: int = Field(0, description="torch threads per process; 0 = cores / "
                               "processes under gunicorn and the stack, all cores when "
                               "training, torch's default elsewhere.")
    model_poll_s: float = Field(0.5, description="How often web processes look for a new model.")
    inference_precision: Precision = Field(
        "auto", description="Serving's conv body: bfloat16 runs it in under half the time where "
        "the CPU has native kernels (AVX512-BF16, AMX); auto = bfloat16 there, else float32.")

    @field_validator("state_dir", "data_dir", "models_dir", mode="after")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Anchor relative paths to the working directory once, at load time."""
        return path.expanduser().resolve()

    @property
    def sqlite_path(self) -> Path:
        return self.state_dir / "urbansound.db"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    @property
    def celery_broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.state_dir / 'broker.db'}"

    @property
    def celery_backend(self) -> str:
        return self.result_backend or f"db+sqlite:///{self.state_dir / 'results.db'}"

    @field_validator("rate_limit_auth_failures", "rate_limit_mutating", mode="after")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        """Fail at start-up, naming the setting, not at the first request."""
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '10/minute': {value!r} ({exc})") from None
        return value

    @property
    def rate_limit_storage_uri(self) -> str:
        """Where the rate-limit counters live: shared by every worker and replica when the
        stack has a Redis (the broker's), per process in the embedded default."""
        if self.rate_limit_storage:
            return self.rate_limit_storage
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return "memory://"

    @property
    def max_body_mb(self) -> int:
        """The largest body any endpoint takes: that of the endpoints that analyse a recording
        (which may be larger than an upload, and no smaller than any request), and what nginx
        lets through on those paths (every other path: ``max_upload_mb``)."""
        return max(self.max_upload_mb, self.max_analyze_mb)

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def uploads_dir(self) -> Path:
        return self.state_dir / "uploads"


@lru_cache
def get_settings() -> Settings:
    """Cached so every caller shares one object; tests call ``get_settings.cache_clear()``."""
    return Settings()
