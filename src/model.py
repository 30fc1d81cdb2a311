"""The CNN, how it is compiled and trained, and the one-file checkpoint it lives in.

Shape of the network: four small conv blocks on a 64-band log-mel image, then pooling over
frequency and a summary over time: the max beside a mean, plain or attention-weighted
(``TIME_POOLS``). Channels are kept narrow where the image is
large (16, 32) and widened only after pooling (64, 128): most of the FLOPs of a plain VGG-ish
net are spent in its first high-resolution layers, and narrowing them is what makes a 4-s clip
cost ~100 MFLOP instead of ~1 GFLOP with little loss of accuracy.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distill import Teachers, distillation_loss
from .errors import UserError
from .evaluation import classification_metrics
from .files import replace_atomically
from .preprocessing import (
    CLASSES,
    FeatureConfig,
    FrontEnd,
    Standardise,
    augment_waveforms,
    band_statistics,
    mixup,
    spec_augment,
)

CHECKPOINT_FORMAT = "urbansound-ckpt/1"
#: a checkpoint as saved and loaded: plain data (see ``make_checkpoint``)
Checkpoint = dict[str, Any]
#: How the last feature map is summarised over frequency. "mean" (the original head) averages
#: the bands away; "bands" keeps each of the n_mels/8 bands, so the head can tell where in the
#: spectrum energy sits — what separates air conditioners, idling engines and jackhammers,
#: whose textures are alike and whose spectral envelopes are not.
FREQ_POOLS = ("mean", "bands")
#: How it is summarised over time, beside the max (the transient evidence). "meanmax" (the
#: original head) takes the plain mean of the frames; "attention" a softmax-weighted mean whose
#: frame scores are learned (attention pooling, as in Kong et al.'s PANNs): a clip is labelled
#: by its salient source, which often fills only part of the 4 s. The scorer starts at zero,
#: so an attention head begins as the mean head and learns only where that helps.
TIME_POOLS = ("meanmax", "attention")
ENVELOPE_DIM = 64


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class Residual(nn.Module):
    """A same-width convolution as a residual branch, ``relu(x + bn(conv(x)))`` (He et al.
    2016): the layer learns a correction to its input instead of a whole new map, so the
    deeper stages can keep what the stage's first convolution found. No parameters beyond the
    plain layer's, and drawn in the same order, so a seed starts from the same weights."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class AudioCNN(nn.Module):
    """Waveform in, logits out: the front end is part of the model so serving cannot skip or
    reorder a preprocessing step."""

    def __init__(
        self, n_classes: int = len(CLASSES), widths: tuple[int, ...] = (16, 32, 64, 128),
        dropout: float = 0.3, config: FeatureConfig | None = None,
        mean: np.ndarray | None = None, std: np.ndarray | None = None,
        freq_pool: str = "mean", envelope: bool = False, time_pool: str = "meanmax",
        residual: bool = False,
    ):
        super().__init__()
        if freq_pool not in FREQ_POOLS:
            raise ValueError(f"freq_pool must be one of {FREQ_POOLS}, not {freq_pool!r}")
        if time_pool not in TIME_POOLS:
            raise ValueError(f"time_pool must be one of {TIME_POOLS}, not {time_pool!r}")
        self.config = config or FeatureConfig()
        self.freq_pool = freq_pool
        n_mels = self.config.n_mels
        self.frontend = FrontEnd(self.config)
        shape = (n_mels,) if self.config.n_channels == 1 else (self.config.n_channels, n_mels)
        self.standardise = Standardise(
            mean if mean is not None else np.zeros(shape, np.float32),
            std if std is not None else np.ones(shape, np.float32),
        )
        w1, w2, w3, w4 = widths

        def same_width(w: int) -> list[nn.Module]:
            """The second convolution of the last two stages, plain or with its skip."""
            return [Residual(w)] if residual else conv_bn(w, w)

        self.body = nn.Sequential(
            *conv_bn(self.config.n_channels, w1), nn.MaxPool2d(2),
            *conv_bn(w1, w2), nn.MaxPool2d(2),
            *conv_bn(w2, w3), *same_width(w3), nn.MaxPool2d(2),
            *conv_bn(w3, w4), *same_width(w4),
        )
        self.dropout = nn.Dropout(dropout)
        bands = n_mels // 8 if freq_pool == "bands" else 1  # three 2x2 max-pools
        # The clip's spectral envelope (each band's mean and spread over time), summarised
        # beside the conv features: simple statistics that tell some recordings of the
        # stationary-noise classes apart where the texture the convolutions learn does not.
        self.envelope = (nn.Sequential(nn.Linear(2 * n_mels, ENVELOPE_DIM), nn.ReLU())
                         if envelope else None)
        self.head = nn.Linear(2 * w4 * bands + (ENVELOPE_DIM if envelope else 0), n_classes)
        # made after every other layer, so the seed draws the same initial weights for those
        # as it does for a mean head
        self.attention = nn.Linear(w4, 1) if time_pool == "attention" else None
        if self.attention is not None:
            nn.init.zeros_(self.attention.weight)
            nn.init.zeros_(self.attention.bias)
        # channels-last lets oneDNN pick its fast conv/pool kernels: ~3x faster training and
        # ~25% faster inference on CPU than the default NCHW layout.
        # torch's stubs omit Module.to's memory_format keyword (documented, and it works)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Waveforms → standardised log-mel (and the front end's other channels), the point
        where SpecAugment/mixup apply."""
        return cast(torch.Tensor, self.standardise(self.frontend(waveforms)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.decide(self.body(x.contiguous(memory_format=torch.channels_last)), x)

    def decide(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The conv body's output ``h`` (and the features ``x`` it came from) → logits: the
        part after the convolutions, apart so serving can run the body at another precision."""
        if self.freq_pool == "mean":
            h = h.mean(dim=2)  # pool frequency: the convolutions already aligned the bands
        # sustained + transient evidence over time; with "bands", per frequency band
        h = torch.cat([self.pool_time(h), h.amax(dim=-1)], dim=1).flatten(1)
        if self.envelope is not None:
            logmel = x[:, 0]  # (batch, mels, frames), standardised
            h = torch.cat([h, self.envelope(torch.cat([logmel.mean(-1), logmel.std(-1)], 1))], 1)
        return cast(torch.Tensor, self.head(self.dropout(h)))

    def pool_time(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (batch, channels, [bands,] frames) → its mean over frames, plain or weighted
        by the attention scorer (a score per frame from that frame's channels)."""
        if self.attention is None:
            return h.mean(dim=-1)
        scores = self.attention(h.movedim(1, -1)).squeeze(-1)  # (batch, [bands,] frames)
        weights = torch.softmax(scores, dim=-1).unsqueeze(1)
        return (h * weights).sum(dim=-1)

    @property
    def time_pool(self) -> str:
        return "meanmax" if self.attention is None else "attention"

    @property
    def residual(self) -> bool:
        return any(isinstance(m, Residual) for m in self.body)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(waveforms))


# --------------------------------------------------------------------------- checkpoints

def build_model(ckpt: Checkpoint) -> AudioCNN:
    model = AudioCNN(
        n_classes=len(ckpt["classes"]), widths=tuple(ckpt["arch"]["widths"]),
        dropout=ckpt["arch"]["dropout"], config=FeatureConfig.from_dict(ckpt["feature_config"]),
        freq_pool=ckpt["arch"].get("freq_pool", "mean"),  # older checkpoints: the mean head
        envelope=ckpt["arch"].get("envelope", False),
        time_pool=ckpt["arch"].get("time_pool", "meanmax"),  # older checkpoints: the mean
        residual=ckpt["arch"].get("residual", False),  # older checkpoints: plain convolutions
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def make_checkpoint(
    model: AudioCNN, classes: tuple[str, ...], version: str, parent: str | None,
    metrics: dict[str, Any], data: dict[str, Any], history: list[dict[str, Any]] | None = None,
    widths: tuple[int, ...] | list[int] | None = None, dropout: float | None = None,
) -> Checkpoint:
    """Only tensors, numbers, strings, lists and dicts: loadable with ``weights_only=True``."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": version,
        "parent": parent,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": list(classes),
        "feature_config": model.config.to_dict(),
        "arch": {
            "name": "AudioCNN",
            "widths": list(widths or _widths(model)),
            "dropout": float(dropout if dropout is not None else model.dropout.p),
            "freq_pool": model.freq_pool,
            "envelope": model.envelope is not None,
            "time_pool": model.time_pool,
            "residual": model.residual,
        },
        "norm_mean": model.standardise.mean.flatten().tolist(),
        "norm_std": model.standardise.std.flatten().tolist(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "data": data,
        "history": history or [],
        "torch": str(torch.__version__),
        "environment": training_environment(),
    }


def training_environment() -> dict[str, str]:
    """What besides the code and the seed decides a run's scores: the library versions and the
    CPU kernels torch dispatches to. One thread repeats a run bit for bit only on the same
    install and CPU: on 4 Dec the served model's own run, repeated on another machine, drifted
    in the fourth decimal of its first epoch's loss and ended two clips lower on fold 3, and
    nothing recorded why."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for name in ("torch", "numpy", "scikit-learn", "soxr", "soundfile"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover - every one is a dependency
            found[name] = "missing"
    return found


def _widths(model: AudioCNN) -> list[int]:
    convs = [m.out_channels for m in model.body.modules() if isinstance(m, nn.Conv2d)]
    return [convs[0], convs[1], convs[2], convs[4]]


def save_checkpoint(ckpt: Checkpoint, path: Path) -> Path:
    """Serialised in memory first, then replaced atomically (``files``): a training killed or
    failing while it saves leaves the previous file at ``path`` whole, never a truncated one
    that a later ``--out`` reader or teacher list would trip over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    replace_atomically(path, buffer.getvalue())
    return path


def kept_val_f1(ckpt: Checkpoint) -> float:
    """Validation macro-F1 of the weights the run kept: the final epoch's with keep="last",
    the best epoch's otherwise. Choosing a run by its best epoch when it kept its final
    weights would choose by a score those weights never had."""
    scores = [r["val_f1"] or 0.0 for r in ckpt["history"]]
    return scores[-1] if ckpt["data"]["train_config"].get("keep") == "last" else max(scores)


def is_refit(ckpt: Checkpoint) -> bool:
    """Trained on the whole training side (``TrainConfig.validation`` 0): nothing was held
    out, so there is no validation score to gate or choose it by, and its card says so. The
    one test of it, for the card, the scripts and any gate."""
    return bool(ckpt.get("data", {}).get("train_config", {}).get("validation") == 0)


class CheckpointError(UserError, ValueError):
    """A file that is not one of our checkpoints, or a corrupt one."""


def load_checkpoint(path: str | Path) -> Checkpoint:
    """``weights_only=True``: a checkpoint from an upload or a shared volume cannot run code."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"No model file at {path}.") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an urbansound checkpoint.")
    return ckpt


# --------------------------------------------------------------------------- training

#: Which weights a run ends with (``TrainConfig.keep``; the ``--keep`` of train and crossval).
Keep = Literal["best", "last"]


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.3
    mixup_prob: float = 0.5
    specaugment: bool = True
    waveform_augment: bool = True
    speed: float = 0.0  # waveform augmentation: playback speed drawn from 1 ± speed; 0 = off
    patience: int = 10
    ema_decay: float = 0.995  # validate and keep an exponential moving average of the weights
    warmup_fraction: float = 0.3  # patience only counts once the LR has peaked and is falling
    seed: int = 0  # weights, batches and augmentation
    split_seed: int = 0  # which recordings validate: fixed, so runs with other seeds compare
    widths: tuple[int, ...] = (16, 32, 64, 128)
    dropout: float = 0.3
    distill_weight: float = 0.7  # with teachers: share of the loss that is their soft targets
    distill_temperature: float = 2.0
    # with teachers: BirdNET's linear probe is a second teacher beside them (see birdnet)
    birdnet_teacher: bool = False
    birdnet_folds: int = 5  # its probe cross-fitted over this many folds; 0: in-sample
    class_weighting: bool = True
    freq_pool: str = "mean"  # see FREQ_POOLS
    # see TIME_POOLS; the recipe's since 4 Dec (docs/trial-decisions.md: grouped macro-F1
    # +0.006 over three seeds); recipes recorded before the option read back as "meanmax"
    time_pool: str = "attention"
    residual: bool = False  # see Residual: skips over the last two stages' second convolution
    envelope: bool = True  # see AudioCNN: the head also sees the band envelope
    eq_std: float = 0.3  # SpecAugment's random equaliser (standardised units); 0 = off
    band_shift: int = 2  # SpecAugment's random shift by up to this many mel bands
    # which weights a run ends with: "best", the best validation epoch's (and stop after
    # ``patience``); "last", the whole schedule's final (averaged) weights, for when the
    # validation set is too small for its best epoch to be more than noise
    keep: Keep = "best"
    # share of the training side's recordings held out to validate on; 0 trains on all of it
    # (a refit: once a recipe is chosen, the clips that chose it are worth more as training
    # data, 19% more of it here), which leaves no epoch to pick, so it needs keep="last"
    validation: float = 0.15
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.validation < 1:
            raise ValueError(f"validation must be in [0, 1), not {self.validation}")
        # choices in both spellings: the CLI shows these messages as its usage errors
        for option, value, choices in (("keep", self.keep, get_args(Keep)),
                                       ("time-pool", self.time_pool, TIME_POOLS)):
            if value not in choices:
                raise ValueError(f"--{option} must be one of {', '.join(choices)} "
                                 f"({option.replace('-', '_')}={value!r})")
        if self.validation == 0 and self.keep == "best":
            # both spellings: the CLI shows this message as its usage error
            raise ValueError("with no validation there is no best epoch to keep: keep the "
                             "whole schedule's final weights (--keep last; keep='last')")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A recipe as ``to_dict`` wrote it; one recorded before an option existed reads back
        as what it trained (the mean head over time), not as today's default."""
        known: dict[str, Any] = {k: (tuple(v) if k == "widths" else v)
                                 for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("time_pool", "meanmax")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, for checkpoints and cross-validation records (tuples as
        lists, so it reads back the same from JSON); ``extra`` is per-run state, not recipe."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k != "extra"}


def compile_model(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, class_counts: np.ndarray | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, nn.CrossEntropyLoss]:
    """AdamW (decoupled weight decay regularises conv nets better than L2 in Adam), a one-cycle
    LR schedule (fast, stable convergence in few epochs) and label-smoothed cross-entropy
    (UrbanSound8K labels are noisy: overlapping sources, weak salience)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=max(1, steps_per_epoch),
        pct_start=cfg.warmup_fraction,
    )
    weight = None
    if cfg.class_weighting and class_counts is not None:
        # inverse square-root frequency: rare classes (car_horn, gun_shot) count, without the
        # instability of full inverse weighting.
        w = 1.0 / np.sqrt(np.maximum(class_counts, 1))
        weight = torch.tensor(w / w.mean(), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    return optimizer, scheduler, loss_fn


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       loss_fn: nn.CrossEntropyLoss) -> torch.Tensor:
    """Cross-entropy against (mixed) probability targets, honouring the loss's settings."""
    return F.cross_entropy(logits, target, weight=loss_fn.weight,
                           label_smoothing=loss_fn.label_smoothing)


@torch.inference_mode()
def predict_logits(model: AudioCNN, waveforms: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    outs = [model(waveforms[i : i + batch_size]) for i in range(0, len(waveforms), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, model.head.out_features)


def evaluate_model(
    model: AudioCNN, waveforms: torch.Tensor, labels: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    logits = predict_logits(model, waveforms)
    return classification_metrics(logits.numpy(), np.asarray(labels), classes)


EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class Optimisation:
    """What one training step needs besides the batch: optimiser, LR schedule, loss, the
    weight average, the teachers, and the generator behind every random choice."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.CrossEntropyLoss
    gen: torch.Generator
    ema: torch.optim.swa_utils.AveragedModel | None = None
    teachers: Teachers | None = None
    clip_probs: torch.Tensor | None = None  # a per-clip teacher's (see distill), row per clip


def train_epoch(model: AudioCNN, train_x: torch.Tensor, targets: torch.Tensor,
                cfg: TrainConfig, opt: Optimisation, n_classes: int) -> float:
    """One pass over the shuffled training set (as in pytorch/examples' ``train``):
    augment → forward → loss → step. Returns the mean training loss."""
    model.train()
    n, total, seen = len(train_x), 0.0, 0
    gen = opt.gen
    order = torch.randperm(n, generator=gen)
    for i in range(0, n, cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        if len(idx) < 2:
            continue
        wave = train_x[idx]
        if cfg.waveform_augment:
            noise_pool = train_x[torch.randint(n, (len(idx),), generator=gen)]
            wave = augment_waveforms(wave, gen, noise_pool, speed=cfg.speed)
        x = model.features(wave)
        if cfg.specaugment:
            x = spec_augment(x, gen, max_band_shift=cfg.band_shift, eq_std=cfg.eq_std)
        y = F.one_hot(targets[idx], n_classes).float()
        # a per-clip teacher's targets ride beside the labels: mixup weighs them as it weighs
        # the clips (and draws the same random numbers with or without them)
        if opt.clip_probs is not None:
            y = torch.cat([y, opt.clip_probs[idx]], dim=1)
        if cfg.mixup_alpha > 0 and float(torch.rand(1, generator=gen)) < cfg.mixup_prob:
            x, y = mixup(x, y, gen, cfg.mixup_alpha)
        y, clip_probs = (y[:, :n_classes], y[:, n_classes:]) if opt.clip_probs is not None \
            else (y, None)
        logits = model.classify(x)
        loss = soft_cross_entropy(logits, y, opt.loss_fn)
        if opt.teachers is not None:
            soft = distillation_loss(logits, opt.teachers(x, clip_probs),
                                     cfg.distill_temperature)
            loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * soft
        opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
        opt.optimizer.step()
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update_parameters(model)
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


class EarlyStopping:
    """Keeps the weights of the best epoch by validation macro-F1 (the metric we report;
    accuracy rewards the big classes) — by training loss when there is no validation set —
    and stops after ``patience`` epochs without a gain, counted only once the LR has peaked
    (``warmup_epochs``): before that, a plateau is the schedule, not the model."""

    def __init__(self, patience: int, warmup_epochs: float):
        self.patience, self.warmup_epochs = patience, warmup_epochs
        self.best, self.bad_epochs = -1.0, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def step(self, epoch: int, record: dict[str, Any], judged: nn.Module) -> bool:
        """Record epoch ``epoch`` (1-based); True when training should stop."""
        score = record["val_f1"] if record["val_f1"] is not None else -record["loss"]
        if score > self.best:
            self.best, self.best_state, self.bad_epochs = (
                score, copy.deepcopy(judged.state_dict()), 0)
        elif epoch > self.warmup_epochs:
            self.bad_epochs += 1
            return self.bad_epochs >= self.patience
        return False

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def fit(
    model: AudioCNN,
    train_x: torch.Tensor, train_y: np.ndarray,
    val_x: torch.Tensor, val_y: np.ndarray,
    cfg: TrainConfig, classes: tuple[str, ...] = CLASSES,
    on_epoch: EpochCallback | None = None, progress: bool = True,
    teachers: Teachers | None = None, clip_probs: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Train an epoch, validate, let early stopping decide; restore the best weights (with
    ``cfg.keep == "last"``: run the whole schedule and keep its final weights).

    With ``teachers`` the loss also pulls the student towards their soft targets (see
    ``distill``); ``clip_probs`` (one row per training clip) adds a per-clip teacher's.
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    steps = math.ceil(len(train_x) / cfg.batch_size)
    counts = np.bincount(train_y, minlength=len(classes))
    optimizer, scheduler, loss_fn = compile_model(model, cfg, steps, counts)
    targets = torch.as_tensor(train_y)
    # The EMA of the weights is what gets validated and kept: with a few hundred validation
    # clips, single-epoch weights make early stopping chase noise; the average is steadier.
    # A short run must not be judged by an average that still remembers the random init: the
    # horizon 1/(1-decay) is capped at a quarter of all steps (long runs keep cfg.ema_decay).
    decay = min(cfg.ema_decay, 1 - 4 / max(8, steps * cfg.epochs))
    average = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)  # type: ignore[no-untyped-call]
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)
           if cfg.ema_decay else None)
    if clip_probs is not None and (teachers is None or len(clip_probs) != len(train_x)):
        raise ValueError("per-clip soft targets need the CNN teachers and one row per clip")
    opt = Optimisation(optimizer, scheduler, loss_fn, gen, ema, teachers,
                       None if clip_probs is None else torch.as_tensor(clip_probs))
    stopper = EarlyStopping(cfg.patience, cfg.warmup_fraction * cfg.epochs)
    history: list[dict[str, Any]] = []
    bar = tqdm(range(cfg.epochs), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        loss = train_epoch(model, train_x, targets, cfg, opt, len(classes))
        judged = cast(AudioCNN, ema.module) if ema is not None else model  # EMA copies model
        val = evaluate_model(judged, val_x, val_y, classes) if len(val_x) else {}
        record = {
            "epoch": epoch + 1, "epochs": cfg.epochs, "loss": loss,
            "val_loss": val.get("loss"), "val_accuracy": val.get("accuracy"),
            "val_f1": val.get("macro_f1"), "seconds": time.perf_counter() - t0,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", val_f1=f"{record['val_f1'] or 0:.3f}")
        if on_epoch:
            on_epoch(record)
        if stopper.step(epoch + 1, record, judged) and cfg.keep == "best":
            break
    if cfg.keep == "last":
        model.load_state_dict(judged.state_dict())
    else:
        stopper.restore(model)
    model.eval()
    return history


def new_model(train_x: torch.Tensor, cfg: TrainConfig, config: FeatureConfig) -> AudioCNN:
    """A fresh model whose standardisation statistics come from the training waveforms."""
    probe = AudioCNN(config=config)
    with torch.inference_mode():
        logmels = torch.cat([probe.frontend(train_x[i : i + 256])
                             for i in range(0, len(train_x), 256)])
    mean, std = band_statistics(logmels)
    # The initial weights are the seed's: drawn from whatever state the global generator was
    # left in, the first model of a process depended on what ran before it (one grouped
    # validation's first fold scored 0.667 in one process and 0.768 in another), and a
    # cross-validation resumed mid-way did not train the folds it would have.
    torch.manual_seed(cfg.seed)
    return AudioCNN(widths=cfg.widths, dropout=cfg.dropout, config=config, mean=mean, std=std,
                    freq_pool=cfg.freq_pool, envelope=cfg.envelope, time_pool=cfg.time_pool,
                    residual=cfg.residual)
