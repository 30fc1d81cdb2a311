"""Knowledge distillation: one served-size model learns from an ensemble of trained ones.

Why: on this data the spread between training runs that differ only in their seed is larger
than most recipe changes (fold-3 accuracy 0.59-0.62), and averaging the predictions of two or
three runs is reliably better than any one of them. Serving an ensemble would multiply the
latency; distilling it (Hinton et al., 2015) keeps one network at serving time. The teachers
see exactly the augmented, mixed input the student sees, so their soft targets describe that
input, not the clean clip.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, cast

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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised student features → mean teacher probabilities at ``temperature``."""
        logmel = x * self.student_std + self.student_mean
        probs = [torch.softmax(m.classify(m.standardise(logmel)) / self.temperature, dim=1)
                 for m in cast("Iterable[Network]", self.models)]
        return torch.stack(probs).mean(0)


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, scaled by T² so its gradients keep the size
    of the hard-label loss's whatever the temperature."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2
