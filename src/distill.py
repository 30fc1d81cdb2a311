"""Knowledge distillation: one served-size model learns from an ensemble of trained ones.

Why: on this data the spread between training runs that differ only in their seed is larger
than most recipe changes (fold-3 accuracy 0.59-0.62), and averaging the predictions of two or
three runs is reliably better than any one of them. Serving an ensemble would multiply the
latency; distilling it (Hinton et al., 2015) keeps one network at serving time. The teachers
see exactly the augmented, mixed input the student sees, so their soft targets describe that
input, not the clean clip.

A second kind of teacher is fixed per clip: a linear probe on a pretrained network's
embedding (``birdnet``), which hears the clean clip only. Its probabilities are cross-fitted
(each clip's come from a probe that never saw its recording) or in-sample (as the CNN
teachers', which saw the clips they teach), and mixed by mixup with the same weights as the
clips they belong to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError


class Network(Protocol):
    """What distillation needs of a network (``model.AudioCNN`` is one; ``model`` imports
    this module, so it is named by its shape here)."""

    @property
    def config(self) -> object: ...
    @property
    def head(self) -> nn.Linear: ...
    @property
    def standardise(self) -> Any: ...  # mean/std buffers and a call: log-mel → standardised
    def classify(self, x: torch.Tensor) -> torch.Tensor: ...


class TeacherError(UserError, ValueError):
    """Teachers that cannot teach this student (other classes or other features)."""


class Teachers(nn.Module):
    """Frozen models whose averaged, temperature-softened probabilities are the soft targets.

    Each teacher keeps its own standardisation statistics: the student's standardised input is
    mapped back to log-mel and re-standardised per teacher, so teachers trained on other
    splits (other band statistics) still see what they were trained on.
    """

    def __init__(self, models: list[nn.Module], student: Network, temperature: float = 2.0):
        super().__init__()
        if not models:
            raise TeacherError("Distillation needs at least one teacher.")
        for m in cast("list[Network]", models):
            if m.config != student.config:
                raise TeacherError("A teacher was trained on other features "
                                   f"({m.config} instead of {student.config}).")
            if m.head.out_features != student.head.out_features:
                raise TeacherError("A teacher predicts another number of classes.")
        self.models = nn.ModuleList(models).eval().requires_grad_(False)
        self.temperature = temperature
        self.student_mean = student.standardise.mean.detach().clone()
        self.student_std = student.standardise.std.detach().clone()

    def train(self, mode: bool = True) -> Teachers:
        return super().train(False)  # batch-norm statistics and dropout stay as trained

    @torch.no_grad()
    def forward(self, x: torch.Tensor, clip_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised student features → mean teacher probabilities at ``temperature``;
        with ``clip_probs`` (a per-clip teacher's, already at its temperature and mixed as the
        batch was), the mean of the two: the ensemble counts as one teacher, the probe as
        another, so three networks that share their errors do not outvote the one that
        hears differently."""
        logmel = x * self.student_std + self.student_mean
        probs = [torch.softmax(m.classify(m.standardise(logmel)) / self.temperature, dim=1)
                 for m in cast("Iterable[Network]", self.models)]
        ensemble = torch.stack(probs).mean(0)
        return ensemble if clip_probs is None else (ensemble + clip_probs) / 2


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, scaled by T² so its gradients keep the size
    of the hard-label loss's whatever the temperature."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def linear_probe(c: float = 0.1) -> Any:
    """The probe that teaches, and the one ``scripts/birdnet_probe.py`` judged: a standardised
    logistic regression; ``c`` = 0.1 was fixed before the grouped protocol read it
    (docs/trial-decisions.md, 5 Dec)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))


def probe_probabilities(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_classes: int,
    temperature: float = 2.0, c: float = 0.1, folds: int = 5, seed: int = 0,
) -> np.ndarray:
    """``(n, n_classes)`` soft targets from a standardised logistic regression on
    ``features``, softened at ``temperature`` as the CNN teachers' are. Cross-fitted by
    default: each row predicted by a probe fitted on the other recordings (``folds``
    recording-grouped, class-stratified folds); ``folds=0`` fits one probe on every clip it
    teaches, as the CNN teachers saw the clips they teach (``linear_probe``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(set(groups.tolist())) < folds:
        raise TeacherError(f"A cross-fitted probe needs at least {folds} recordings.")
    out = np.zeros((len(labels), n_classes), dtype=np.float32)
    everything = np.arange(len(labels))
    splits = (StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
              .split(features, labels, groups) if folds else [(everything, everything)])
    for train, test in splits:
        probe = linear_probe(c).fit(features[train], labels[train])
        # log-probabilities are the logits up to a constant per row, which softmax ignores;
        # a class missing from this fold's training side gets probability 0
        logits = np.full((len(test), n_classes), -np.inf)
        logits[:, probe.classes_] = probe.predict_log_proba(features[test])
        out[test] = torch.softmax(torch.from_numpy(logits / temperature), dim=1).numpy()
    return out
