"""What CLIP-KD's caption-mode objectives see, their base class and their registry.

In caption mode (``kdprompt clipkd``) the student's image and text towers both train on image-text
pairs against a frozen teacher CLIP. A batch holds the features of every rank's pairs (gathered, as
open_clip's ``ClipLoss`` gathers them), so in-batch contrasts span the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from kdprompt.objectives.base import ObjectiveConfig
from kdprompt.registry import Registry


@dataclass
class CaptionBatch:
    """Features of a global batch of N image-text pairs (row i of every tensor is pair i).

    Attributes:
        image: the student's normalised image features (N x Ds).
        text: the student's normalised text features (N x Ds).
        image_proj: ``normalize(proj_image(raw student image features))`` in the teacher's width (N x Dt);
            None when no enabled objective needs the projection.
        text_proj: the same for text.
        teacher_image: the teacher's normalised image features (N x Dt).
        teacher_text: the teacher's normalised text features (N x Dt).
        logit_scale: the student's exponentiated logit scale (0-d, trains).
        teacher_logit_scale: the teacher's exponentiated logit scale (0-d, frozen).
    """

    image: Tensor
    text: Tensor
    image_proj: Tensor | None
    text_proj: Tensor | None
    teacher_image: Tensor
    teacher_text: Tensor
    logit_scale: Tensor
    teacher_logit_scale: Tensor

    def labels(self) -> Tensor:
        """The matching pair of each row: ``arange(N)``."""
        return torch.arange(self.image.shape[0], device=self.image.device)

    def student_logits(self) -> Tensor:
        """The student's image-to-text logits ``λS · image textᵀ`` (N x N)."""
        return self.logit_scale * self.image @ self.text.t()

    def teacher_logits(self) -> Tensor:
        """The teacher's image-to-text logits ``λT · t_image t_textᵀ`` (N x N)."""
        return self.teacher_logit_scale * self.teacher_image @ self.teacher_text.t()


class CaptionObjective(nn.Module):
    """Base of the caption-mode objectives: built from its ``Config``, forward gives the unweighted value.

    ``uses_projection``: the objective reads ``image_proj``/``text_proj`` (the combiner then builds the
    linear projectors from the student's width to the teacher's). ``uses_student_logits``: it reads the
    student's logits, so the student's logit scale trains.
    """

    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    uses_projection: ClassVar[bool] = False
    uses_student_logits: ClassVar[bool] = False

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, batch: CaptionBatch) -> Tensor:
        """The objective's unweighted scalar for one global batch."""
        raise NotImplementedError


CLIPKD_OBJECTIVES: Registry[type[CaptionObjective]] = Registry("clipkd objective")
