"""Helpers shared by the web app's tests (code, integration, browser): audio bytes, a small
model registry, free ports. Plain functions, importable as ``web_helpers`` (``tests/`` is on
``sys.path`` because it holds the root ``conftest.py``)."""

from __future__ import annotations

import io
import os
import socket
import wave
from pathlib import Path

import numpy as np
import pytest

TOKEN = "test-token-0123456789"
PASSWORD = "test-admin-password"


def wav_bytes(y: np.ndarray, sr: int = 22050) -> bytes:
    """16-bit mono WAV of ``y`` (floats in [-1, 1])."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def tone(seconds: float = 1.0, freq: float = 440.0, sr: int = 22050, seed: int = 0) -> bytes:
    """A noisy sine: decodable, not silent, and different bytes for each (freq, seed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return wav_bytes(0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size), sr)


def build_registry(checkpoint: dict, root: Path) -> Path:
    """``root/models`` holding quick-1 (served), quick-2 (a candidate: same weights, new
    name), quick-bad (rejected by the gate) and broken (a corrupt file)."""
    from src import registry
    from src.model import save_checkpoint

    models = root / "models"
    base = dict(checkpoint, torch=str(checkpoint["torch"]))  # weights_only-safe
    for version, parent in (("quick-1", None), ("quick-2", "quick-1"), ("quick-bad", "quick-1")):
        tmp = save_checkpoint(dict(base, version=version, parent=parent), root / f"{version}.pt")
        registry.publish(tmp, version, models_dir=models)
    registry.activate("quick-1", models_dir=models)
    registry.reject("quick-bad", "quality gate: worse than quick-1", models_dir=models)
    (models / "broken.pt").write_bytes(b"not a checkpoint")
    return models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(reason: str) -> None:
    """Missing services or tools fail in CI (``CI`` set) and skip elsewhere, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)", pytrace=False)
    pytest.skip(f"{reason}; CI runs this test")
