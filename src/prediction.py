"""Serving-side inference: load a checkpoint once, then clip → label + probabilities.

``Predictor`` wraps one immutable model version. ``LivePredictor`` follows the registry's
pointer: it notices a new served version within ``poll_s`` (one ``stat`` call per check),
loads it off the request path and swaps the reference in one assignment, so a request is
always answered by exactly one complete model and names which one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .model import build_model, load_checkpoint
from .preprocessing import AudioSource, load_clip

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    label: str
    class_id: int
    confidence: float
    probabilities: dict[str, float]
    model_version: str
    top_k: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """One loaded model version, traced and frozen for fast single-clip CPU inference."""

    def __init__(self, checkpoint: dict | str | Path, optimise: bool = True):
        self.checkpoint_path = None if isinstance(checkpoint, dict) else Path(checkpoint)
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        self.version: str = ckpt["version"]
        self.classes: tuple[str, ...] = tuple(ckpt["classes"])
        self.metrics: dict = ckpt.get("metrics", {})
        self.model = build_model(ckpt)
        self.config = self.model.config
        self._forward = self._optimised() if optimise else self.model

    def _optimised(self):
        """TorchScript trace + freeze + optimize_for_inference folds batch norm into the
        convolutions and drops Python overhead: ~30% off single-clip latency on CPU."""
        example = torch.zeros(1, self.config.n_samples)
        try:
            with torch.inference_mode():
                traced = torch.jit.trace(self.model, example)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except Exception as exc:
            log.warning("TorchScript optimisation failed (%s); serving the eager model", exc)
            return self.model

    @torch.inference_mode()
    def probabilities(self, waveforms: np.ndarray) -> np.ndarray:
        """``(n, samples)`` fixed-length waveforms (as ``load_clip`` returns) → ``(n, classes)``."""
        x = torch.from_numpy(np.ascontiguousarray(waveforms, dtype=np.float32))
        if x.ndim == 1:
            x = x.unsqueeze(0)
        return torch.softmax(self._forward(x), dim=1).numpy()

    def load(self, source: AudioSource) -> np.ndarray:
        return load_clip(source, self.config)

    def from_probabilities(self, probs: np.ndarray, top_k: int = 3) -> Prediction:
        order = np.argsort(probs)[::-1]
        best = int(order[0])
        return Prediction(
            label=self.classes[best], class_id=best, confidence=float(probs[best]),
            probabilities={c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            model_version=self.version,
            top_k=[{"label": self.classes[i], "probability": float(probs[i])}
                   for i in order[:top_k]],
        )

    def predict(self, source: AudioSource, top_k: int = 3) -> Prediction:
        """Raises ``preprocessing.AudioError`` (with a code and message) for bad audio."""
        return self.from_probabilities(self.probabilities(self.load(source))[0], top_k)

    def predict_many(self, sources: list[AudioSource], top_k: int = 3) -> list[Prediction]:
        """Batched forward pass: clips that arrive together cost less than one by one."""
        if not sources:
            return []
        probs = self.probabilities(np.stack([self.load(s) for s in sources]))
        return [self.from_probabilities(p, top_k) for p in probs]

    @torch.inference_mode()
    def logmel(self, waveform: np.ndarray) -> np.ndarray:
        """The (unstandardised) log-mel the model sees, for display."""
        x = torch.from_numpy(np.asarray(waveform, dtype=np.float32)).unsqueeze(0)
        return self.model.logmel(x)[0, 0].numpy()


class LivePredictor:
    """Follows the served version in ``models_dir``; safe to share between threads."""

    def __init__(self, models_dir: Path, poll_s: float = 0.5, optimise: bool = True):
        from . import registry

        self._registry = registry
        self.models_dir = Path(models_dir)
        self.poll_s = poll_s
        self.optimise = optimise
        self._lock = threading.Lock()
        self._loading = False
        self._checked = 0.0
        self._signature = registry.current_signature(self.models_dir)
        _version, path = registry.current(self.models_dir)
        self.current = Predictor(path, optimise)
        self.loaded_at = time.time()

    def get(self) -> Predictor:
        """The predictor to use for this request; at most one stat call per ``poll_s``."""
        now = time.monotonic()
        if now - self._checked >= self.poll_s:
            self._checked = now
            self.refresh(background=True)
        return self.current

    def refresh(self, background: bool = False) -> bool:
        """Load the pointer's version if it changed. In the background the old model keeps
        answering until the new one is fully loaded; the swap is one reference assignment."""
        signature = self._registry.current_signature(self.models_dir)
        if signature == self._signature:
            return False
        with self._lock:
            if self._loading:
                return False
            self._loading = True
        if background:
            # not a daemon: torch aborts the process if a daemon thread is inside it at exit
            threading.Thread(target=self._load, args=(signature,), daemon=False).start()
        else:
            self._load(signature)
        return True

    def _load(self, signature) -> None:
        try:
            version, path = self._registry.current(self.models_dir)
            if version != self.current.version:
                self.current = Predictor(path, self.optimise)
                self.loaded_at = time.time()
                log.info("now serving model %s", version)
            self._signature = signature
        except Exception:
            log.exception("could not load the new model; still serving %s", self.current.version)
        finally:
            with self._lock:
                self._loading = False

    def predict(self, source: AudioSource, top_k: int = 3) -> Prediction:
        return self.get().predict(source, top_k)
