"""Everything between an audio file and the tensor the CNN sees.

One code path for training and serving: ``load_clip`` (decode, check, mono, resample,
normalise, pad/trim) and ``LogMel`` (STFT + mel filterbank in torch, matched to librosa) are
used by the data sets, the trainer and the predictor alike, so the features cannot drift apart.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

from .errors import UserError

SAMPLE_RATE = 22_050
CLIP_SECONDS = 4.0
CLASSES: tuple[str, ...] = (
    "air_conditioner",
    "car_horn",
    "children_playing",
    "dog_bark",
    "drilling",
    "engine_idling",
    "gun_shot",
    "jackhammer",
    "siren",
    "street_music",
)

AudioSource = str | Path | bytes | IO[bytes]


# Undecodable bytes are an unsupported media type; a file that decodes but cannot be used
# (silent, too short, odd rate) is unprocessable; a missing or empty one is a bad request.
AUDIO_STATUS = {"undecodable": 415, "empty": 400, "not_found": 400}


class AudioError(UserError, ValueError):
    """A clip we refuse, with a stable machine-readable ``code`` and a human message."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code, status=AUDIO_STATUS.get(code, 422))


@dataclass(frozen=True)
class FeatureConfig:
    """Stored in every checkpoint: a model is only valid with the features it was trained on."""

    sample_rate: int = SAMPLE_RATE
    clip_seconds: float = CLIP_SECONDS
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = SAMPLE_RATE / 2
    pad_mode: str = "repeat"  # short events are tiled: padding with silence teaches "silence"
    target_dbfs: float = -20.0  # RMS level every clip is scaled to before features
    # image channels the CNN sees (see FRONTENDS); checkpoints without the key are "logmel"
    frontend: str = "logmel+pcen"

    @property
    def n_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length + 1

    @property
    def n_channels(self) -> int:
        return len(self.frontend.split("+"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("frontend", "logmel")  # what every checkpoint before the key had
        return cls(**known)


@dataclass(frozen=True)
class AudioInfo:
    samplerate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate if self.samplerate else 0.0


# --------------------------------------------------------------------------- decoding

def _open(source: AudioSource) -> sf.SoundFile:
    """Open with libsndfile, turning its many failure modes into one AudioError."""
    if isinstance(source, bytes | bytearray):
        if not source:
            raise AudioError("empty", "The file is empty.")
        source = io.BytesIO(source)
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise AudioError("not_found", f"No such file: {path.name}")
        if path.stat().st_size == 0:
            raise AudioError("empty", "The file is empty.")
    try:
        return sf.SoundFile(source)
    except Exception as exc:  # libsndfile fails on hostile input in many ways: all one answer
        raise AudioError(
            "undecodable",
            "Not a readable audio file (WAV, FLAC, OGG or MP3 expected): "
            + str(exc).split(":")[-1].strip(),
        ) from None


def probe(source: AudioSource) -> AudioInfo:
    """Header only: cheap checks (rate, channels, claimed length) before reading samples."""
    with _open(source) as f:
        return _info(f)


def _info(f: sf.SoundFile) -> AudioInfo:
    """The header of an open file, in the one shape ``probe`` and ``decode_measured`` share."""
    return AudioInfo(f.samplerate, f.channels, f.frames, f.format, f.subtype)


def decode(source: AudioSource, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode to float32 ``(frames, channels)``; reads at most ``max_seconds`` (bounded work
    even when a header claims gigabytes)."""
    data, info = decode_measured(source, max_seconds)
    return data, info.samplerate


def decode_measured(source: AudioSource, max_seconds: float | None = None
                    ) -> tuple[np.ndarray, AudioInfo]:
    """``decode`` plus the header it read (the whole file's length, not just what was read):
    one open instead of a ``probe`` and a ``decode``, ~0.2 ms of a ~3.5 ms prediction."""
    with _open(source) as f:
        if f.samplerate < 1000 or f.samplerate > 384_000:
            raise AudioError("bad_rate", f"Unsupported sample rate {f.samplerate} Hz.")
        if f.channels < 1 or f.channels > 32:
            raise AudioError("bad_channels", f"Unsupported channel count {f.channels}.")
        limit = -1 if max_seconds is None else math.ceil(max_seconds * f.samplerate)
        try:
            data = f.read(frames=limit, dtype="float32", always_2d=True)
        except Exception as exc:  # a corrupt body fails in many ways too
            raise AudioError("undecodable", f"The audio data is corrupt: {exc}") from None
        return data, _info(f)


def to_mono(data: np.ndarray) -> np.ndarray:
    """Average the channels as one matrix-vector product: ``data.mean(axis=1)`` on a
    ``(frames, 2)`` array walks a 2-wide axis 176,400 times and cost ~3 ms per clip, a third
    of a whole prediction; the BLAS product does the same sum in ~0.1 ms."""
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    if data.shape[1] == 1:
        return np.ascontiguousarray(data[:, 0], dtype=np.float32)
    weights = np.full(data.shape[1], 1.0 / data.shape[1], dtype=np.float32)
    return np.asarray(data, dtype=np.float32) @ weights


def resample(y: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    if sr_in == sr_out:
        return y
    out: np.ndarray = soxr.resample(y, sr_in, sr_out, quality="HQ")  # soxr is untyped
    return out.astype(np.float32, copy=False)


def check_samples(y: np.ndarray, sr: int, min_seconds: float = 0.05) -> None:
    """Refuse what would give meaningless features: too short, silent or non-finite."""
    if y.size == 0:
        raise AudioError("empty", "The file contains no audio samples.")
    if not np.isfinite(y).all():
        raise AudioError("non_finite", "The audio contains NaN or infinite samples.")
    if y.size / sr < min_seconds:
        raise AudioError(
            "too_short", f"The clip lasts {1000 * y.size / sr:.0f} ms; at least "
            f"{1000 * min_seconds:.0f} ms is needed."
        )
    if float(np.abs(y).max()) < 1e-6:
        raise AudioError("silent", "The clip is silent (no sample reaches -120 dBFS).")


def normalise_level(y: np.ndarray, target_dbfs: float) -> np.ndarray:
    """Scale to a fixed RMS level. Field recorders set their own gain, so absolute level says
    more about the microphone than the source; this makes the model exactly gain-invariant."""
    rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
    return (y * (10 ** (target_dbfs / 20) / max(rms, 1e-8))).astype(np.float32)


def fix_length(y: np.ndarray, n: int, mode: str = "repeat") -> np.ndarray:
    if y.size >= n:
        return y[:n]
    if mode == "repeat":
        return np.tile(y, math.ceil(n / y.size))[:n]
    return np.pad(y, (0, n - y.size))


def load_clip(
    source: AudioSource, config: FeatureConfig | None = None, min_seconds: float = 0.05
) -> np.ndarray:
    """File → the fixed-length, level-normalised mono waveform the front end takes.

    Only the first ``clip_seconds`` are decoded: a 10-minute file costs what a 4-s one does.
    """
    return load_clip_measured(source, config, min_seconds)[0]


def load_clip_measured(
    source: AudioSource, config: FeatureConfig | None = None, min_seconds: float = 0.05
) -> tuple[np.ndarray, AudioInfo]:
    """``load_clip`` plus the file's header, so a prediction can say how much of how long a
    file it heard without opening the file a second time."""
    cfg = config or FeatureConfig()
    data, info = decode_measured(source, max_seconds=cfg.clip_seconds)
    y = to_mono(data)
    check_samples(y, info.samplerate, min_seconds)
    y = resample(y, info.samplerate, cfg.sample_rate)
    return fix_length(normalise_level(y, cfg.target_dbfs), cfg.n_samples, cfg.pad_mode), info


# --------------------------------------------------------------------------- labels

_LABEL_CLEAN = re.compile(r"[^a-z0-9]+")


def normalise_label(name: str, classes: tuple[str, ...] = CLASSES) -> str | None:
    """Map a folder name ("Dog Bark", "dog-bark", "3", "3-dog_bark") to a class, or None."""
    key = _LABEL_CLEAN.sub("_", name.strip().lower()).strip("_")
    if key in classes:
        return key
    if key.isdigit() and int(key) < len(classes):
        return classes[int(key)]
    head, _, tail = key.partition("_")
    if head.isdigit() and tail in classes:
        return tail
    return None


def encode_labels(labels: list[str], classes: tuple[str, ...] = CLASSES) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    try:
        return np.array([index[label] for label in labels], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"Unknown label {exc.args[0]!r}; known: {', '.join(classes)}") from None


# --------------------------------------------------------------------------- log-mel front end

def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mels = f / f_sp
    log_part = f >= min_log_hz
    mels[log_part] = min_log_mel + np.log(f[log_part] / min_log_hz) / logstep
    return mels


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    freqs = f_sp * m
    log_part = m >= min_log_mel
    freqs[log_part] = min_log_hz * np.exp(logstep * (m[log_part] - min_log_mel))
    return freqs


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-normalised triangular filters, ``(n_mels, n_fft // 2 + 1)``, as librosa builds."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array([fmin]))[0],
                                   _hz_to_mel(np.array([fmax]))[0], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


class LogMel(nn.Module):
    """Waveforms ``(batch, samples)`` → log-mel ``(batch, 1, n_mels, frames)`` in dB.

    Same conventions as ``librosa.power_to_db(librosa.feature.melspectrogram(...))``:
    centred frames with zero padding, periodic Hann window, power spectrum, Slaney mel
    filters, ``10 log10(max(S, 1e-10))``. Lives in torch so it batches on CPU or GPU.
    """

    window: torch.Tensor  # buffers, registered below: typed here for the checker
    fb: torch.Tensor

    def __init__(self, config: FeatureConfig):
        super().__init__()
        self.n_fft, self.hop = config.n_fft, config.hop_length
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        fb = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin,
                            config.fmax)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)

    def power(self, y: torch.Tensor) -> torch.Tensor:
        """Mel power ``(batch, n_mels, frames)``, before the log."""
        spec = torch.stft(y, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="constant", return_complex=True)
        return torch.matmul(self.fb, spec.real.square() + spec.imag.square())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return to_db(self.power(y)).unsqueeze(1)


def to_db(power: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.log10(power.clamp_min(1e-10))


#: The channels a front end stacks, "+"-joined; the first is always the log-mel.
#: "pcen": per-channel energy normalisation (Wang et al. 2017) of the same mel power: gain-
#: and stationary-background-invariant, so it shows onsets and modulation (a jackhammer's
#: hits) that the log-mel of a loud steady hum buries. "delta": the log-mel's slope over time.
FRONTENDS = ("logmel", "logmel+pcen", "logmel+delta", "logmel+pcen+delta")
#: how each channel is named to people (the model card, the Predict page)
CHANNEL_NAMES = {"logmel": "log-mel", "pcen": "PCEN (per-channel energy normalised)",
                 "delta": "delta"}


def channel_names(frontend: str) -> list[str]:
    """The front end's channels as people read them, log-mel first."""
    return [CHANNEL_NAMES.get(kind, kind) for kind in frontend.split("+")]


def pcen_smoother(s: float, frames: int) -> torch.Tensor:
    """PCEN's first-order IIR smoother ``M[t] = (1-s) M[t-1] + s E[t]``, ``M[-1] = E[0]``, as
    a ``(frames, frames)`` matrix to multiply by: exact, and one BLAS call instead of a Python
    loop over frames, which keeps serving fast."""
    t = torch.arange(frames, dtype=torch.float64)
    lag = t.view(1, -1) - t.view(-1, 1)  # [j, t] = t - j
    matrix = torch.where(lag >= 0, s * (1 - s) ** lag.clamp_min(0), torch.zeros(()))
    matrix[0] += (1 - s) ** (t + 1)  # the state before the first frame: the first frame
    return matrix.float()


class FrontEnd(nn.Module):
    """Waveforms → ``(batch, channels, n_mels, frames)``: the log-mel, plus the channels
    ``config.frontend`` names. No learnt parameters: checkpoints stay plain state dicts."""

    smoother: torch.Tensor
    delta_kernel: torch.Tensor

    def __init__(self, config: FeatureConfig, pcen_time_constant: float = 0.4,
                 alpha: float = 0.98, delta: float = 2.0, r: float = 0.5):
        super().__init__()
        if config.frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, not {config.frontend!r}")
        self.kinds = config.frontend.split("+")
        self.logmel = LogMel(config)
        # librosa.pcen's defaults: time constant 0.4 s at the frame rate, alpha, delta, r
        t_frames = pcen_time_constant * config.sample_rate / config.hop_length
        s = (math.sqrt(1 + 4 * t_frames**2) - 1) / (2 * t_frames**2)
        self.s = s
        self.register_buffer("smoother", pcen_smoother(s, config.n_frames), persistent=False)
        self.alpha, self.delta, self.r = alpha, delta, r
        n = torch.arange(-4, 5, dtype=torch.float32)  # librosa.feature.delta's width 9
        self.register_buffer("delta_kernel", (n / n.square().sum()).view(1, 1, -1),
                             persistent=False)

    def pcen(self, power: torch.Tensor) -> torch.Tensor:
        frames = power.shape[-1]
        # causal: the matrix for fewer frames is the top-left corner of this one. Serving
        # traces fixed-length clips, so the tracer never meets the (Python) length test.
        tracing = torch.jit.is_tracing()  # type: ignore[no-untyped-call]  # untyped in torch
        if not tracing and frames > self.smoother.shape[0]:
            matrix = pcen_smoother(self.s, frames).to(power.device)
        else:
            matrix = self.smoother[:frames, :frames]
        smooth = power @ matrix
        gain = power / (1e-6 + smooth).pow(self.alpha)
        return (gain + self.delta).pow(self.r) - math.pow(self.delta, self.r)

    def slope(self, db: torch.Tensor) -> torch.Tensor:
        b, m, t = db.shape
        x = torch.nn.functional.pad(db.reshape(b * m, 1, t), (4, 4), mode="replicate")
        return torch.nn.functional.conv1d(x, self.delta_kernel).reshape(b, m, t)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        power = self.logmel.power(y)
        db = to_db(power)
        channels = [db]
        if "pcen" in self.kinds:
            channels.append(self.pcen(power))
        if "delta" in self.kinds:
            channels.append(self.slope(db))
        return torch.stack(channels, dim=1)


# --------------------------------------------------------------------------- normalisation

def band_statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-mel-band mean/std over a training set ``(N, channels, mels, frames)``, shaped
    ``(mels,)`` for one channel and ``(channels, mels)`` for more; saved with the model.

    Per band rather than global because low bands carry far more energy than high ones;
    standardising each lets the first convolutions see every band at a similar scale.
    """
    _, c, m, _ = images.shape
    x = images.permute(1, 2, 0, 3).reshape(c * m, -1).double()
    mean, std = x.mean(1).float().numpy(), x.std(1).clamp_min(1e-3).float().numpy()
    return (mean, std) if c == 1 else (mean.reshape(c, m), std.reshape(c, m))


class Standardise(nn.Module):
    mean: torch.Tensor  # buffers, registered below: typed here for the checker
    std: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        shape = (1, -1, np.shape(mean)[-1], 1)  # (mels,) or (channels, mels)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------- augmentation

def change_speed(y: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Play each clip ``factors[i]`` times as fast (pitch and tempo together), keeping its
    length: read at ``factor * t``, linearly interpolated, wrapping around the end as the
    circular shift and the tiled padding already do.

    Why speed rather than a pitch shift: a machine running faster is what another recording of
    the same class sounds like (an engine's firing rate, a fan's blade tone), and resampling
    is one cheap gather on the waveform batch. Above 1 the top ``1 - 1/factor`` of the band
    folds back: at 10% that is the last kHz under Nyquist, where these clips hold little.
    """
    length = y.shape[1]
    pos = factors.view(-1, 1) * torch.arange(length, dtype=y.dtype).view(1, -1)
    i0 = pos.floor().long()
    frac = pos - i0
    i0 = i0 % length
    return torch.gather(y, 1, i0) * (1 - frac) + torch.gather(y, 1, (i0 + 1) % length) * frac


def augment_waveforms(
    y: torch.Tensor, gen: torch.Generator, noise: torch.Tensor | None = None,
    max_shift: float = 0.25, max_gain_db: float = 6.0, noise_snr_db: tuple[float, float] = (10, 30),
    speed: float = 0.0,
) -> torch.Tensor:
    """Speed (when ``speed`` > 0: a factor drawn from [1 - speed, 1 + speed]), gain, circular
    time shift and background noise, per example.

    Gain is kept even though features are level-normalised at load time: it perturbs the mix
    with the background noise added here. ``noise`` is a pool of other clips' waveforms. With
    ``speed`` 0 no random number is drawn for it, so older recipes replay the same augmentation.
    """
    n, length = y.shape
    if speed > 0:
        y = change_speed(y, 1 + (torch.rand(n, generator=gen) * 2 - 1) * speed)
    out = torch.empty_like(y)
    shifts = (torch.rand(n, generator=gen) * 2 - 1) * max_shift * length
    for i in range(n):
        out[i] = torch.roll(y[i], int(shifts[i]))
    gain = 10 ** ((torch.rand(n, 1, generator=gen) * 2 - 1) * max_gain_db / 20)
    out = out * gain
    if noise is not None and len(noise):
        pick = torch.randint(len(noise), (n,), generator=gen)
        bg = noise[pick]
        snr = torch.empty(n, 1).uniform_(*noise_snr_db, generator=gen)
        sig_p = out.square().mean(1, keepdim=True).clamp_min(1e-10)
        bg_p = bg.square().mean(1, keepdim=True).clamp_min(1e-10)
        use = (torch.rand(n, 1, generator=gen) < 0.5).float()
        out = out + use * bg * torch.sqrt(sig_p / (bg_p * 10 ** (snr / 10)))
    return out


def spec_augment(
    x: torch.Tensor, gen: torch.Generator, freq_masks: int = 2, freq_width: int = 8,
    time_masks: int = 2, time_width: int = 20, max_band_shift: int = 2, eq_std: float = 0.3,
) -> torch.Tensor:
    """SpecAugment masks (Park et al. 2019), filled with 0 = the standardised mean, plus two
    augmentations against the recording chain: a shift of a few mel bands and a random smooth
    equaliser curve. UrbanSound8K's folds differ mostly in microphones and places, so a model
    that tolerates spectral colouring generalises across folds better."""
    n, _, n_mels, n_frames = x.shape
    x = x.clone()
    if eq_std > 0:
        pos = torch.linspace(0, math.pi, n_mels).view(1, 1, -1, 1)
        coef = torch.randn(n, 3, generator=gen) * eq_std
        curve = sum(coef[:, k].view(-1, 1, 1, 1) * torch.cos(k * pos) for k in range(3))
        x[:, :1] += curve  # the log-mel only: PCEN and delta channels are blind to a fixed EQ
    for i in range(n):
        shift = int(torch.randint(-max_band_shift, max_band_shift + 1, (1,), generator=gen))
        if shift:
            x[i] = torch.roll(x[i], shift, dims=1)
        for _ in range(freq_masks):
            w = int(torch.randint(0, freq_width + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, n_mels - w), (1,), generator=gen))
            x[i, :, f0 : f0 + w, :] = 0
        for _ in range(time_masks):
            w = int(torch.randint(0, time_width + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, max(1, n_frames - w), (1,), generator=gen))
            x[i, :, :, t0 : t0 + w] = 0
    return x


def mixup(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, alpha: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix pairs of examples and their one-hot targets (Zhang et al. 2018)."""
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(
        alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


# --------------------------------------------------------------------------- splits

def fold_split(folds: np.ndarray, test_folds: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of clips outside / inside ``test_folds``. UrbanSound8K's folds never share a
    recording, so the official folds are leak-free by construction."""
    folds = np.asarray(folds)
    in_test = np.isin(folds, list(test_folds))
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def group_split(
    labels: np.ndarray, groups: np.ndarray, fraction: float = 0.15, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split where a group (fsID: slices of one recording) lands on one side only.

    Slices of one recording are near-duplicates; letting them straddle the split inflates
    validation scores and picks the wrong early-stopping epoch.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_splits = max(2, round(1 / fraction))
    n_groups = len(set(groups.tolist()))
    if n_groups < n_splits:
        raise ValueError(f"Need at least {n_splits} recordings to split, got {n_groups}.")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, hold = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return keep, hold
