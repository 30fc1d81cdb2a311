"""Serving-side inference: load a checkpoint once, then clip → label + probabilities.

``Predictor`` wraps one immutable model version. ``LivePredictor`` follows the registry's
pointer: it notices a new served version within ``poll_s`` (two ``stat`` calls and a small
read per check), verifies the file's sha256 against the pointer, loads it off the request
path and swaps the reference in one assignment, so a request is always answered by exactly
one complete model and names which one. A pointer it cannot trust changes nothing but its
``pointer`` state, which readiness and the metrics report.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import torch
from torch import nn

from .errors import one_line
from .model import AudioCNN, build_model, load_checkpoint
from .preprocessing import AudioSource, load_clip, load_clip_measured
from .settings import Precision

if TYPE_CHECKING:
    from .registry import PointerCheck

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    label: str
    class_id: int
    confidence: float
    probabilities: dict[str, float]
    model_version: str
    top_k: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float | None = None  # the file's length by its header (None: not known)
    analysed_s: float | None = None  # how much of it the answer heard: the first clip_seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRECISIONS: tuple[str, ...] = get_args(Precision)


def serving_precision(requested: str = "auto") -> str:
    """``float32`` or ``bfloat16``: what ``requested`` means on this CPU. bfloat16 is chosen
    only where oneDNN has native kernels (AVX512-BF16 or AMX); emulated, it is slower than
    float32, so ``auto`` never picks it there."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    return "bfloat16" if native_bfloat16() else "float32"


def native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (torch's own test)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class ReducedPrecision(nn.Module):
    """The model with its conv body in bfloat16 and everything else in float32.

    The body is ~85% of the forward pass and 2.7x faster in bfloat16 on a CPU with native
    kernels; the front end (FFT, log, PCEN) and the head stay in float32, where rounding
    would move the features themselves. On fold 3, 382-386 of 387 answers are the same as
    float32 for the models served on 3 Dec.
    """

    def __init__(self, model: AudioCNN, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model = model
        self.body = copy.deepcopy(model.body).to(dtype)
        self.dtype = dtype

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        x = self.model.features(waveforms)
        h = self.body(x.to(self.dtype).contiguous(memory_format=torch.channels_last))
        return self.model.decide(h.float(), x)


class Predictor:
    """One loaded model version, traced and frozen for fast single-clip CPU inference."""

    def __init__(self, checkpoint: dict[str, Any] | str | Path, optimise: bool = True,
                 precision: str = "auto"):
        self.checkpoint_path = None if isinstance(checkpoint, dict) else Path(checkpoint)
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        self.version: str = ckpt["version"]
        self.classes: tuple[str, ...] = tuple(ckpt["classes"])
        self.metrics: dict[str, Any] = ckpt.get("metrics", {})
        self.model = build_model(ckpt)
        self.config = self.model.config
        #: what the conv body runs in (``float32`` without ``optimise``: the model as trained)
        self.precision = serving_precision(precision) if optimise else "float32"
        self._forward = self._optimised() if optimise else self.model

    def _optimised(self) -> nn.Module:
        """TorchScript trace + freeze + optimize_for_inference folds batch norm into the
        convolutions and drops Python overhead: ~30% off single-clip latency on CPU.

        TorchScript is deprecated (torch 2.13 warns). Where tracing fails, the same network
        runs eagerly in the same precision, because the bfloat16 body is most of the gain:
        model-only p50 1.70 ms eager against 1.49 ms traced, and 2.66 ms for the eager
        float32 model this used to fall back to (one thread; ``bench_core.py`` prints the
        end-to-end figure of this path as "untraced")."""
        example = torch.zeros(1, self.config.n_samples)
        net = ReducedPrecision(self.model) if self.precision == "bfloat16" else self.model
        try:
            with torch.inference_mode():
                traced = torch.jit.trace(net, example)  # type: ignore[no-untyped-call]
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except Exception as exc:
            log.warning("TorchScript optimisation failed (%s); serving the eager model (%s)",
                        exc, self.precision)
        return self._eager(net, example)

    def _eager(self, net: nn.Module, example: torch.Tensor) -> nn.Module:
        """``net`` untraced, once it has answered ``example``; the float32 model where the
        bfloat16 body cannot run at all, so a request never meets the failure first."""
        if net is self.model:
            return self.model
        try:
            with torch.inference_mode():
                net(example)
            return net
        except Exception as exc:
            log.warning("the bfloat16 body failed (%s); serving float32", exc)
            self.precision = "float32"
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

    def load_measured(self, source: AudioSource) -> tuple[np.ndarray, float | None,
                                                          float | None]:
        """``load`` plus how long the file is and how much of it the model hears, so an
        answer about the first ``clip_seconds`` never passes for one about the whole file."""
        waveform, info = load_clip_measured(source, self.config)
        if info.frames <= 0 or info.samplerate <= 0:
            return waveform, None, None
        duration = info.frames / info.samplerate
        return waveform, round(duration, 3), round(min(duration, self.config.clip_seconds), 3)

    def answer(self, probs: np.ndarray, duration_s: float | None, analysed_s: float | None,
               top_k: int = 3) -> Prediction:
        """``from_probabilities`` with the file's length and what of it was heard."""
        prediction = self.from_probabilities(probs, top_k)
        prediction.duration_s, prediction.analysed_s = duration_s, analysed_s
        return prediction

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
        waveform, duration, analysed = self.load_measured(source)
        return self.answer(self.probabilities(waveform)[0], duration, analysed, top_k)

    def predict_many(self, sources: list[AudioSource], top_k: int = 3) -> list[Prediction]:
        """Batched forward pass: clips that arrive together cost less than one by one."""
        if not sources:
            return []
        loaded = [self.load_measured(s) for s in sources]
        probs = self.probabilities(np.stack([w for w, _, _ in loaded]))
        return [self.answer(p, d, a, top_k) for p, (_, d, a) in zip(probs, loaded, strict=True)]

    @torch.inference_mode()
    def logmel(self, waveform: np.ndarray) -> np.ndarray:
        """The (unstandardised) log-mel the model sees, for display."""
        x = torch.from_numpy(np.asarray(waveform, dtype=np.float32)).unsqueeze(0)
        image: np.ndarray = self.model.frontend.logmel(x)[0, 0].numpy()
        return image


POINTER_PROBLEMS = {
    "pointer_unreadable": "pointer unreadable",
    "hash_mismatch": "hash mismatch",
    "older_than_pointer": "serving an older version than the pointer names",
}


@dataclass(frozen=True)
class PointerState:
    """Whether this process serves the version the registry's pointer names, and if not why:
    ``ok`` or one of ``POINTER_PROBLEMS`` (readiness and the metrics report it)."""

    state: str
    message: str

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def load_verified(path: Path, sha256: str) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded from the very bytes whose sha256 was checked: a file
    swapped between the pointer check and the load is refused, never served."""
    from .model import CHECKPOINT_FORMAT, CheckpointError

    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CheckpointError(f"{Path(path).name} has sha256 {actual[:12]}…, the pointer says "
                              f"{sha256[:12]}…")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{Path(path).name} is not a readable checkpoint "
                              f"({' '.join(str(exc).split())[:200]}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{Path(path).name} is not an urbansound checkpoint.")
    return ckpt


class LivePredictor:
    """Follows the served version in ``models_dir``; safe to share between threads.

    The pointer is verified, never trusted blindly: a new version is loaded only from bytes
    whose sha256 is the one ``CURRENT`` recorded at activation, and only if the checkpoint
    says it is that version. When the pointer cannot be followed (unreadable, a hash mismatch,
    a missing or corrupt file) the model already loaded keeps answering and ``pointer`` says
    why, until the pointer or the file is fixed (both are watched)."""

    def __init__(self, models_dir: Path, poll_s: float = 0.5, optimise: bool = True,
                 watch: bool = False, precision: str = "auto",
                 on_change: Callable[[str, PointerState], None] | None = None):
        """``on_change(version, pointer)`` runs after each swap and each change of the pointer
        state, on whichever thread saw it (often the watcher, with no request in flight):
        what reports the served version or a pointer problem must hear of it there, not on
        the worker's next request, which may never come."""
        from . import registry

        self._registry = registry
        self.on_change = on_change
        self.models_dir = Path(models_dir)
        self.poll_s = poll_s
        self.optimise = optimise
        self.precision = precision
        self._lock = threading.Lock()
        self._loading = False
        self._checked = 0.0
        signature = registry.pointer_signature(self.models_dir)
        check = registry.check_pointer(self.models_dir)
        predictor, error = self._try_load(check) if check.ok else (None, None)
        if predictor is None:  # the registry's fallback: the last activated file still intact
            _version, path = registry.fallback(
                self.models_dir, error or check.message, exclude=check.version if error else None)
            predictor = Predictor(path, optimise, precision)
        self.current: Predictor = predictor
        self.loaded_at = time.time()
        self.pointer = self._judge(check, error)
        self._signature = (signature, self._served_stat())
        if watch:  # requests look at the pointer too, but a server worker no client reaches
            # (keep-alive connections pin clients to workers) must still follow a promotion
            threading.Thread(target=_watch, args=(weakref.ref(self),), name="model-watch",
                             daemon=True).start()

    def get(self) -> Predictor:
        """The predictor to use for this request; the pointer is looked at (two stat calls and
        one small read) at most once per ``poll_s``."""
        now = time.monotonic()
        if now - self._checked >= self.poll_s:
            self._checked = now
            self.refresh(background=True)
        return self.current

    def _served_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.current.checkpoint_path) if self.current.checkpoint_path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None

    def refresh(self, background: bool = False) -> bool:
        """Check the pointer again if it, the file it names or the served file changed; load
        the version it names if that is new. In the background the old model keeps answering
        until the new one is fully loaded; the swap is one reference assignment."""
        signature = (self._registry.pointer_signature(self.models_dir), self._served_stat())
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

    def _try_load(self, check: PointerCheck) -> tuple[Predictor | None, str | None]:
        """The pointer's version loaded from verified bytes, or None and why not."""
        assert check.path is not None and check.sha256 is not None  # a verified pointer
        try:
            ckpt = load_verified(check.path, check.sha256)
            predictor = Predictor(ckpt, self.optimise, self.precision)
        except Exception as exc:
            return None, f"{check.version} did not load ({one_line(exc)[:300]})"
        if predictor.version != check.version:
            return None, (f"{check.path.name} holds version {predictor.version!r}, not "
                          f"{check.version}")
        predictor.checkpoint_path = check.path
        return predictor, None

    def _judge(self, check: PointerCheck, error: str | None) -> PointerState:
        served = self.current.version
        if not check.ok:
            state = {"unreadable": "pointer_unreadable",
                     "hash_mismatch": "hash_mismatch"}.get(check.state, "older_than_pointer")
            why = check.message
        elif error is not None:
            state, why = "older_than_pointer", error
        elif check.version != served:
            state, why = "older_than_pointer", f"the pointer names {check.version}"
        else:
            return PointerState("ok", f"serving {served}, the version the pointer names")
        return PointerState(state, f"{POINTER_PROBLEMS[state]}: {why}; still serving {served}")

    def _announce(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self.current.version, self.pointer)
            except Exception:  # a report failing must not look like a pointer problem
                log.exception("could not report serving %s (%s)", self.current.version,
                              self.pointer.state)

    def _load(self, signature: tuple[Any, ...]) -> None:
        before = (self.current.version, self.pointer)
        try:
            try:
                check = self._registry.check_pointer(self.models_dir)
                error = None
                if check.ok and check.version != self.current.version:
                    predictor, error = self._try_load(check)
                    if predictor is not None:
                        self.current = predictor
                        self.loaded_at = time.time()
                        log.info("now serving model %s", predictor.version)
                state = self._judge(check, error)
            except Exception as exc:
                log.exception("could not follow the model pointer; still serving %s",
                              self.current.version)
                state = PointerState(
                    "older_than_pointer", f"{POINTER_PROBLEMS['older_than_pointer']}: "
                    f"{one_line(exc)}; still serving {self.current.version}")
            if not state.ok and state != self.pointer:
                log.error("model pointer: %s", state.message)
            elif state.ok and not self.pointer.ok:
                log.info("model pointer trusted again: %s", state.message)
            self.pointer = state
            self._signature = signature
            if (self.current.version, self.pointer) != before:
                self._announce()
        finally:
            with self._lock:
                self._loading = False

    def predict(self, source: AudioSource, top_k: int = 3) -> Prediction:
        return self.get().predict(source, top_k)


def _watch(ref: weakref.ref[LivePredictor]) -> None:
    """Look at the pointer every ``poll_s`` for as long as the predictor lives (only stat
    calls here: a load runs in its own, non-daemon thread, so exit never cuts one short)."""
    while (live := ref()) is not None:
        poll_s = live.poll_s
        try:
            live.get()
        except Exception:  # never let the watcher die; requests still check as well
            log.exception("model pointer check failed")
        del live
        time.sleep(poll_s)
