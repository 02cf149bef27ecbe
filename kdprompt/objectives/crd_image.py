"""``crd_image``: an image-to-image adaptation of CLIP-KD's contrastive relational distillation.

CLIP-KD's own CRD compares the in-batch image-to-*text* logits of teacher and student and needs
captions: that is ``crd`` of ``kdprompt clipkd`` (:mod:`kdprompt.objectives.clipkd`). Here image-to-image
relations (without the diagonal) stand in for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdprompt.errors import KdpromptError
from kdprompt.objectives.base import OBJECTIVES, DistillBatch, Objective, ObjectiveConfig


class CRDImageObjectiveConfig(ObjectiveConfig):
    """``crd_image``: KL between teacher and student in-batch relation distributions (CLIP-KD CRD)."""

    temperature: float = Field(default=0.07, gt=0)


@OBJECTIVES.register("crd_image")
class CRDImageObjective(Objective):
    """KL between teacher and student in-batch relation distributions (CLIP-KD CRD, image side).

    For each anchor k, ``p[k] = softmax over j ≠ k of (f_k·f_j / τ)``, from ``t`` for the teacher and
    ``s`` for the student; the loss is ``Σ_k KL(p_T[k] ‖ p_S[k]) / B``.
    """

    Config = CRDImageObjectiveConfig

    def __init__(self, cfg: CRDImageObjectiveConfig) -> None:
        super().__init__(cfg)
        self.temperature = cfg.temperature

    @staticmethod
    def _off_diagonal(sim: Tensor) -> Tensor:
        """B x (B-1): each row without its self-similarity.

        Dropping the diagonal (rather than filling it with -inf) keeps 0·(-inf) NaNs out of the
        KL and its gradient.
        """
        b = sim.shape[0]
        keep = ~torch.eye(b, dtype=torch.bool, device=sim.device)
        return sim[keep].view(b, b - 1)

    def forward(self, batch: DistillBatch) -> Tensor:
        """Per-anchor KL over the other B-1 samples, averaged over anchors."""
        b = batch.student.shape[0]
        if b < 2:
            raise KdpromptError(
                f"objective crd_image relates each image to the others in its batch and needs a batch of at least 2, "
                f"got {b}; raise train.batch_size or drop crd_image"
            )
        tau = self.temperature
        rel_t = self._off_diagonal(batch.teacher @ batch.teacher.t() / tau)
        rel_s = self._off_diagonal(batch.student @ batch.student.t() / tau)
        total = F.kl_div(
            F.log_softmax(rel_s, dim=-1), F.log_softmax(rel_t, dim=-1), reduction="sum", log_target=True
        )
        return total / b
