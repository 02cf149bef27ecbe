"""``icl_image``: an image-to-image adaptation of CLIP-KD's interactive contrastive learning.

CLIP-KD's own ICL contrasts the student's image features with the teacher's *text* features of the
batch and needs captions: that is ``icl`` of ``kdprompt clipkd`` (:mod:`kdprompt.objectives.clipkd`).
Without captions the teacher's image features stand in for its text features here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdprompt.objectives.base import OBJECTIVES, DistillBatch, Objective, ObjectiveConfig


class ICLImageObjectiveConfig(ObjectiveConfig):
    """``icl_image``: student features as anchors contrasted with the batch's teacher features (CLIP-KD ICL)."""

    init_temperature: float = Field(default=0.07, gt=0, description="learnable, kept in log space")
    min_temperature: float = Field(
        default=0.01, gt=0, description="clamp: 1/temperature never exceeds 1/this"
    )


@OBJECTIVES.register("icl_image")
class ICLImageObjective(Objective):
    """Cross-entropy of ``scale · s tᵀ`` against the diagonal: student anchors, teacher contrasts (CLIP-KD ICL, image to image).

    ``scale = exp(log_scale)`` clamped at ``1 / min_temperature``; ``log_scale`` is a learnable
    parameter starting at ``log(1 / init_temperature)``. CLIP-KD's released code used the log-space
    parameter directly as the scale; exponentiating it is what the method intends.
    """

    Config = ICLImageObjectiveConfig

    def __init__(self, cfg: ICLImageObjectiveConfig) -> None:
        super().__init__(cfg)
        self.max_scale = 1.0 / cfg.min_temperature
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    @property
    def scale(self) -> Tensor:
        """The current (clamped) inverse temperature."""
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, batch: DistillBatch) -> Tensor:
        """Mean over anchors k of ``-log softmax_j(scale · s_k·t_j)[k]``."""
        logits = self.scale.to(batch.student) * batch.student @ batch.teacher.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels)
