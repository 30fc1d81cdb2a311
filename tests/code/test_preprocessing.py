"""Decoding, checks, front end, labels, splits and augmentation."""

from __future__ import annotations

import struct
import time

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from web_helpers import audio_bytes, tone_samples

from src.datasets import read_us8k
from src.preprocessing import (
    CLASSES,
    FRONTENDS,
    AudioError,
    FeatureConfig,
    FrontEnd,
    LogMel,
    augment_waveforms,
    change_speed,
    decode,
    encode_labels,
    fold_split,
    group_split,
    load_clip,
    mel_filterbank,
    mixup,
    normalise_label,
    spec_augment,
)

CFG = FeatureConfig()


WAV_SUBTYPES = ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "IMA_ADPCM",
                "MS_ADPCM"]
RATES = [8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000]


# libsndfile's ADPCM encoders write at most two channels; every other pair is covered
VARIANTS = [(s, c) for s in WAV_SUBTYPES for c in (1, 2, 6) if not (s.endswith("ADPCM") and c > 2)]


@pytest.mark.parametrize(("subtype", "channels"), VARIANTS)
def test_every_wav_variant_decodes_to_the_same_clip(subtype, channels, tmp_path):
    data = tone_samples(1.0, sr=44100, channels=channels)
    raw = audio_bytes(data, 44100, subtype)
    path = tmp_path / "x.wav"
    path.write_bytes(raw)
    from_bytes, from_path = load_clip(raw), load_clip(path)
    assert from_bytes.shape == (CFG.n_samples,) and from_bytes.dtype == np.float32
    np.testing.assert_array_equal(from_bytes, from_path)
    reference = load_clip(audio_bytes(data, 44100, "FLOAT"))
    # lossy ADPCM and 8-bit are close, not equal, to the float original
    tol = 0.2 if subtype in ("IMA_ADPCM", "MS_ADPCM", "PCM_U8") else 1e-3
    head = slice(0, 20000)  # ADPCM pads its last block, so the tiled tail may differ in phase
    assert np.corrcoef(from_bytes[head], reference[head])[0, 1] > 1 - tol


@pytest.mark.parametrize("rate", RATES)
def test_every_sample_rate_is_resampled_to_22050(rate):
    y = load_clip(audio_bytes(tone_samples(2.0, 1000, rate, channels=1), rate))
    spectrum = np.abs(np.fft.rfft(y[: CFG.sample_rate]))
    peak_hz = spectrum.argmax() * CFG.sample_rate / CFG.sample_rate
    assert abs(peak_hz - 1000) < 5  # the tone lands at the same frequency after resampling


@pytest.mark.parametrize(("fmt", "subtype"), [("FLAC", "PCM_16"), ("FLAC", "PCM_24"),
                                              ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats_decode(fmt, subtype):
    y = load_clip(audio_bytes(tone_samples(channels=1), 22050, subtype, fmt))
    assert y.shape == (CFG.n_samples,) and np.isfinite(y).all()


def test_original_urbansound_bytes_all_load(originals):
    files = sorted((originals / "audio").rglob("*.wav"))
    assert len(files) == 27
    infos = set()
    for f in files:
        info = sf.info(f)
        infos.add((info.samplerate, info.channels, info.subtype))
        y = load_clip(f)
        assert y.shape == (CFG.n_samples,) and np.isfinite(y).all() and np.abs(y).max() > 0
    assert len(infos) > 3  # the set really does mix rates, channel counts and bit depths


def test_stereo_is_downmixed_by_averaging():
    left, right = tone_samples(freq=300, channels=1), tone_samples(freq=3000, channels=1)
    data, _sr = decode(audio_bytes(np.hstack([left, right]), 22050, "FLOAT"))
    assert data.shape[1] == 2
    from src.preprocessing import to_mono

    np.testing.assert_allclose(to_mono(data), (left[:, 0] + right[:, 0]) / 2, atol=1e-6)
    six = np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32)
    np.testing.assert_allclose(to_mono(six), six.mean(axis=1), atol=1e-6)
    assert to_mono(six[:, :1]).flags.c_contiguous  # soxr wants contiguous input
    np.testing.assert_array_equal(to_mono(six[:, 0]), six[:, 0])


def test_level_normalisation_makes_clips_gain_invariant():
    quiet = load_clip(audio_bytes(tone_samples(channels=1) * 0.01, 22050, "FLOAT"))
    loud = load_clip(audio_bytes(tone_samples(channels=1) * 0.9, 22050, "FLOAT"))
    np.testing.assert_allclose(quiet, loud, rtol=1e-4, atol=1e-6)


def test_short_clips_are_tiled_or_zero_padded():
    short = audio_bytes(tone_samples(0.5, channels=1), 22050, "FLOAT")
    tiled = load_clip(short)
    np.testing.assert_allclose(tiled[: 11025], tiled[11025:22050], atol=1e-6)
    padded = load_clip(short, FeatureConfig(pad_mode="zero"))
    assert np.all(padded[11025:] == 0)


# ------------------------------------------------------------------ bad input

def wav_header_claiming(n_bytes: int, payload: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, 22050, 44100, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", n_bytes) + payload)


@pytest.mark.parametrize(("payload", "code"), [
    (b"", "empty"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "undecodable"),  # truncated header
    (b"this is definitely not audio, just text" * 20, "undecodable"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "undecodable"),
])
def test_unreadable_input_gets_a_clear_error(payload, code):
    with pytest.raises(AudioError) as err:
        load_clip(payload)
    assert err.value.code == code and err.value.message


def test_header_claiming_gigabytes_is_read_boundedly():
    payload = (np.sin(np.arange(22050) / 5) * 20000).astype("<i2").tobytes()
    raw = wav_header_claiming(4_000_000_000, payload)
    start = time.perf_counter()
    y = load_clip(raw)
    assert y.shape == (CFG.n_samples,)
    assert time.perf_counter() - start < 5  # bounded: nothing near 4 GB is allocated


def test_ten_minute_clip_only_decodes_what_is_needed(monkeypatch):
    data = tone_samples(600.0, sr=8000, channels=1)
    raw = audio_bytes(data, 8000)
    frames_read = []
    original = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        frames_read.append(frames)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    assert load_clip(raw).shape == (CFG.n_samples,)
    assert frames_read == [int(8000 * CFG.clip_seconds)]


@pytest.mark.parametrize(("data", "code"), [
    (np.zeros((22050, 1), np.float32), "silent"),
    (tone_samples(0.01, channels=1), "too_short"),
    (np.where(np.arange(22050)[:, None] == 100, np.nan, tone_samples(channels=1)), "non_finite"),
    (np.where(np.arange(22050)[:, None] == 100, np.inf, tone_samples(channels=1)), "non_finite"),
])
def test_meaningless_audio_is_refused(data, code):
    with pytest.raises(AudioError) as err:
        load_clip(audio_bytes(data.astype(np.float32), 22050, "FLOAT"))
    assert err.value.code == code


def test_a_clip_below_the_silence_floor_is_silent_and_told_so_truly():
    """Not zeros, but under -120 dBFS: refused as silent, without claiming the samples are 0."""
    quiet = tone_samples(channels=1) * 1e-7
    assert np.abs(quiet).max() > 0
    with pytest.raises(AudioError) as err:
        load_clip(audio_bytes(quiet.astype(np.float32), 22050, "FLOAT"))
    assert err.value.code == "silent" and "-120 dBFS" in err.value.message
    assert "zero" not in err.value.message


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AudioError) as err:
        load_clip(tmp_path / "nope.wav")
    assert err.value.code == "not_found"


# ------------------------------------------------------------------ front end

def test_mel_filterbank_matches_librosa():
    for n_mels, fmax in [(64, 11025), (128, 8000), (40, 11025)]:
        ours = mel_filterbank(22050, 1024, n_mels, 0.0, fmax)
        ref = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=n_mels, fmin=0.0, fmax=fmax)
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_logmel_front_end_matches_librosa(us8k):
    front = LogMel(CFG)
    for path in sorted((us8k / "audio" / "fold1").glob("*.flac"))[:8]:
        y = load_clip(path)
        ours = front(torch.from_numpy(y)[None])[0, 0].numpy()
        ref = librosa.power_to_db(
            librosa.feature.melspectrogram(y=y, sr=CFG.sample_rate, n_fft=CFG.n_fft,
                                           hop_length=CFG.hop_length, n_mels=CFG.n_mels),
            ref=1.0, amin=1e-10, top_db=None)
        assert ours.shape == ref.shape == (CFG.n_mels, CFG.n_frames)
        assert np.abs(ours - ref).max() < 0.01  # dB


def test_front_end_channels_match_librosa(us8k):
    """PCEN and delta channels are librosa's, computed from the same mel power; the first
    channel is always the plain log-mel, so displays and older models see what they did."""
    config = FeatureConfig(frontend="logmel+pcen+delta")
    front = FrontEnd(config)
    y = load_clip(sorted((us8k / "audio" / "fold1").glob("*.flac"))[0])
    wave = torch.from_numpy(y)[None]
    image = front(wave)[0].numpy()
    assert image.shape == (3, config.n_mels, config.n_frames)
    np.testing.assert_allclose(image[0], LogMel(config)(wave)[0, 0].numpy(), atol=1e-4)
    power = front.logmel.power(wave)[0].numpy().astype(np.float64)
    # librosa starts its smoother from 1; ours from the first frame's steady state
    zi = power[:, :1] * (1 - front.s)
    pcen = librosa.pcen(power, sr=config.sample_rate, hop_length=config.hop_length, gain=0.98,
                        bias=2, power=0.5, eps=1e-6, zi=zi)
    np.testing.assert_allclose(image[1], pcen, atol=1e-4)
    delta = librosa.feature.delta(image[0].astype(np.float64), width=9)
    np.testing.assert_allclose(image[2][:, 4:-4], delta[:, 4:-4], atol=1e-3)  # edges differ
    with pytest.raises(ValueError, match="frontend must be one of"):
        FrontEnd(FeatureConfig(frontend="mfcc"))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_extra_channels_barely_move_with_level(frontend):
    """What the extra channels are for: 20 dB more level moves every log-mel value by 20 dB;
    the delta not at all, PCEN (gain ** (1 - alpha), alpha = 0.98) by a few hundredths."""
    config = FeatureConfig(frontend=frontend)
    front = FrontEnd(config)
    torch.manual_seed(0)
    wave = torch.randn(1, config.n_samples) * torch.linspace(0.02, 0.2, config.n_samples)
    quiet, loud = front(wave)[0], front(wave * 10)[0]
    torch.testing.assert_close(loud[0], quiet[0] + 20.0, atol=1e-3, rtol=0)
    for c, kind in enumerate(config.frontend.split("+")[1:], start=1):
        moved = (loud[c] - quiet[c]).abs()
        if kind == "delta":
            assert float(moved.max()) < 1e-3
        else:
            assert float(moved.mean()) < 0.05 and float(moved.max()) < 0.15


# ------------------------------------------------------------------ labels

@pytest.mark.parametrize(("name", "expected"), [
    ("dog_bark", "dog_bark"), ("Dog Bark", "dog_bark"), ("dog-bark", "dog_bark"),
    ("3", "dog_bark"), ("8-siren", "siren"), ("cat_meow", None), ("", None), ("12", None),
    ("../siren", "siren"),
])
def test_label_normalisation(name, expected):
    assert normalise_label(name) == expected


def test_label_encoding_is_stable_and_strict():
    assert list(encode_labels(list(CLASSES))) == list(range(10))
    with pytest.raises(ValueError, match="cat"):
        encode_labels(["cat"])


# ------------------------------------------------------------------ splits

def test_official_folds_never_share_a_recording(us8k):
    clips = read_us8k(us8k)
    train_idx, test_idx = fold_split(np.array([c.fold for c in clips]), {3})
    assert len(test_idx) and len(train_idx)
    assert not {clips[i].group for i in train_idx} & {clips[i].group for i in test_idx}


def test_group_split_keeps_recordings_whole_and_stratifies(us8k):
    clips = read_us8k(us8k, {1, 2})
    labels = encode_labels([c.label for c in clips])
    groups = np.array([c.group for c in clips])
    keep, hold = group_split(labels, groups, 0.15, seed=3)
    assert not set(groups[keep]) & set(groups[hold])
    assert 0.08 < len(hold) / len(clips) < 0.25
    assert len(set(labels[hold])) >= 8  # most classes appear on the held-out side


def test_group_split_refuses_too_few_recordings():
    with pytest.raises(ValueError, match="recordings"):
        group_split(np.array([0, 1, 0]), np.array(["a", "a", "b"]), 0.2)


# ------------------------------------------------------------------ augmentation

def test_waveform_augmentation_is_seeded_and_changes_the_signal():
    x = torch.from_numpy(np.stack([load_clip(audio_bytes(tone_samples(freq=f), 22050, "FLOAT"))
                                  for f in (300, 900)]))
    a = augment_waveforms(x, torch.Generator().manual_seed(1), x.flip(0))
    b = augment_waveforms(x, torch.Generator().manual_seed(1), x.flip(0))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and not torch.allclose(a, x)


def _peak_hz(y: torch.Tensor, sr: int = 22050) -> float:
    spectrum = torch.fft.rfft(y).abs()
    return float(spectrum.argmax()) * sr / len(y)


def test_change_speed_scales_the_pitch_and_keeps_the_length():
    x = torch.from_numpy(np.stack([tone_samples(freq=500)] * 3)).float()
    out = change_speed(x, torch.tensor([1.0, 1.2, 0.8]))
    assert out.shape == x.shape
    torch.testing.assert_close(out[0], x[0])
    assert [round(_peak_hz(y)) for y in out] == [500, 600, 400]


def test_speed_augmentation_stays_within_its_range_and_off_draws_nothing():
    x = torch.from_numpy(np.stack([tone_samples(freq=1000)] * 16)).float()
    fast = augment_waveforms(x, torch.Generator().manual_seed(3), speed=0.1, max_shift=0,
                             max_gain_db=0)
    peaks = [_peak_hz(y) for y in fast]
    assert all(895 <= p <= 1105 for p in peaks) and max(peaks) - min(peaks) > 50
    # speed 0 leaves the random stream alone: an older recipe replays the same augmentation
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    augment_waveforms(x, g1, speed=0.0)
    augment_waveforms(x, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_spec_augment_masks_bands_and_frames():
    x = torch.ones(4, 1, 64, 173)
    out = spec_augment(x, torch.Generator().manual_seed(0), freq_width=10, time_width=30,
                       max_band_shift=0, eq_std=0)
    assert (out == 0).any() and (out == 1).any()
    assert torch.equal(x, torch.ones_like(x))  # input untouched


def test_spec_augment_colours_each_example_with_a_smooth_curve():
    x = torch.zeros(3, 1, 64, 10)
    out = spec_augment(x, torch.Generator().manual_seed(0), freq_masks=0, time_masks=0,
                       max_band_shift=0, eq_std=0.3)
    curve = out[:, 0, :, 0]
    assert torch.equal(out, curve[:, None, :, None].expand_as(out))  # same gain in every frame
    assert curve.std(dim=1).min() > 0  # it really colours the spectrum...
    assert (curve[:, 1:] - curve[:, :-1]).abs().max() < 0.2  # ...smoothly across bands
    assert not torch.allclose(curve[0], curve[1])  # and differently per example


def test_mixup_targets_stay_distributions():
    x = torch.randn(8, 1, 4, 4)
    y = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
    mx, my = mixup(x, y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(my.sum(1), torch.ones(8))
    assert mx.shape == x.shape
