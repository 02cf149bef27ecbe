"""``fd``: feature distillation, the image half of CLIP-KD's FD."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdprompt.objectives.base import OBJECTIVES, DistillBatch, Objective, ObjectiveConfig


class FDObjectiveConfig(ObjectiveConfig):
    """``fd``: mean squared error between student and teacher features (CLIP-KD FD, weight 2000)."""

    weight: float = Field(default=2000.0, ge=0)


@OBJECTIVES.register("fd")
class FDObjective(Objective):
    """Mean squared error between student and teacher features over all B·D elements (CLIP-KD FD)."""

    Config = FDObjectiveConfig

    def __init__(self, cfg: FDObjectiveConfig) -> None:
        super().__init__(cfg)

    def forward(self, batch: DistillBatch) -> Tensor:
        """``mean((s - t)²)``."""
        return F.mse_loss(batch.student, batch.teacher)
