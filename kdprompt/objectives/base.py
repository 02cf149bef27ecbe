"""What every distillation objective sees, the objective base class and the registry.

An objective is one file: an :class:`Objective` subclass with a ``Config`` (a pydantic model with at
least ``weight``), registered with ``@OBJECTIVES.register("name")``. Recipes name it under
``objectives:``; ``forward`` returns the UNweighted scalar and the combiner applies the weight.
All objectives work on L2-normalised features (DESIGN.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from kdprompt.config.base import StrictModel
from kdprompt.registry import Registry


class ObjectiveConfig(StrictModel):
    """Settings every objective has: its weight in the total loss."""

    weight: float = Field(default=1.0, ge=0)


class Objective(nn.Module):
    """Base of the distillation objectives: built from its ``Config``, forward gives the unweighted value."""

    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, batch: DistillBatch) -> Tensor:
        """The objective's unweighted scalar for one batch."""
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@dataclass
class DistillBatch:
    """What every distillation objective sees for one batch of B unlabelled images.

    Attributes:
        student: ``s = normalize(projector(student(x)))`` (B x D).
        teacher: the frozen teacher's normalised image features ``t`` (B x D).
        text: the cached normalised class text features ``W`` (C x D).
        logit_scale: the teacher's exponentiated logit scale ``λ`` (float or 0-d tensor).
    """

    student: Tensor
    teacher: Tensor
    text: Tensor
    logit_scale: float | Tensor

    def float32(self) -> DistillBatch:
        """A copy in float32 on the student's device; the teacher side is detached (it never trains)."""
        s = self.student.float()
        scale = torch.as_tensor(self.logit_scale, dtype=torch.float32, device=s.device).detach()
        return DistillBatch(
            student=s,
            teacher=self.teacher.detach().to(s.device, torch.float32),
            text=self.text.detach().to(s.device, torch.float32),
            logit_scale=scale,
        )

    def logits(self) -> tuple[Tensor, Tensor]:
        """``(zT, zS) = (λ t Wᵀ, λ s Wᵀ)``, each B x C."""
        w = self.text.t()
        return self.logit_scale * self.teacher @ w, self.logit_scale * self.student @ w
