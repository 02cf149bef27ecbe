"""CLIP-KD's caption-mode losses (Yang et al., CVPR 2024; winycg/CLIP-KD ``src/open_clip/loss.py``,
``KDClipLoss``): the student's own CLIP ``task`` loss plus ``fd``, ``icl`` and ``crd``.

Default weights are those of CLIP-KD's published runs (``script/ViT_L_14_KD_Laion/*.sh``:
``--alpha_fd_loss 2000 --alpha_icl_loss 1 --alpha_ckd_loss 1``; the task loss is always added once).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdprompt.objectives.base import ObjectiveConfig
from kdprompt.objectives.caption import CLIPKD_OBJECTIVES, CaptionBatch, CaptionObjective


def _symmetric_ce(logits_image: Tensor, logits_text: Tensor, labels: Tensor) -> Tensor:
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


@CLIPKD_OBJECTIVES.register("task")
class TaskObjective(CaptionObjective):
    """The student's own CLIP loss: symmetric cross-entropy of ``λS · image textᵀ`` against the diagonal."""

    uses_student_logits = True

    def forward(self, batch: CaptionBatch) -> Tensor:
        logits = batch.student_logits()
        return _symmetric_ce(logits, logits.t(), batch.labels())


class FDConfig(ObjectiveConfig):
    """``fd``: ``mse(image_proj, t_image) + mse(text_proj, t_text)``, each a mean over elements (weight 2000)."""

    weight: float = Field(default=2000.0, ge=0)


@CLIPKD_OBJECTIVES.register("fd")
class FDObjective(CaptionObjective):
    """Feature distillation of both towers: projected, normalised student features onto the teacher's."""

    Config = FDConfig
    uses_projection = True

    def forward(self, batch: CaptionBatch) -> Tensor:
        assert batch.image_proj is not None and batch.text_proj is not None
        return F.mse_loss(batch.image_proj, batch.teacher_image) + F.mse_loss(
            batch.text_proj, batch.teacher_text
        )


ScaleMode = Literal["linear", "exp"]


class ICLConfig(ObjectiveConfig):
    """``icl``: interactive contrastive learning between the student's and the teacher's towers (weight 1)."""

    init_scale: float = Field(
        default=math.log(1 / 0.07), gt=0, description="initial value of the learnable cross_logit_scale"
    )
    scale_mode: ScaleMode = Field(
        default="linear",
        description=(
            "linear: the logits are multiplied by cross_logit_scale itself, as CLIP-KD's code does "
            "(starting at ln(1/0.07) ≈ 2.66); exp: by exp(cross_logit_scale) clamped at max_scale, the "
            "temperature reading of the paper (starting at 1/0.07)"
        ),
    )
    max_scale: float = Field(
        default=100.0, gt=0, description="exp mode only: the clamp of exp(cross_logit_scale)"
    )


@CLIPKD_OBJECTIVES.register("icl")
class ICLObjective(CaptionObjective):
    """Student images against the teacher's texts and student texts against the teacher's images.

    ``(CE(c · image_proj t_textᵀ, diag) + CE(c · text_proj t_imageᵀ, diag)) / 2`` with ``c`` the learnable
    ``cross_logit_scale`` (used as is by default: see :class:`ICLConfig`).
    """

    Config = ICLConfig
    uses_projection = True

    def __init__(self, cfg: ICLConfig) -> None:
        super().__init__(cfg)
        self.mode = cfg.scale_mode
        self.max_scale = cfg.max_scale
        self.cross_logit_scale = nn.Parameter(torch.tensor(float(cfg.init_scale)))

    @property
    def scale(self) -> Tensor:
        """The multiplier of the cross logits."""
        if self.mode == "exp":
            return self.cross_logit_scale.exp().clamp(max=self.max_scale)
        return self.cross_logit_scale

    def forward(self, batch: CaptionBatch) -> Tensor:
        assert batch.image_proj is not None and batch.text_proj is not None
        c = self.scale.to(batch.image_proj)
        return _symmetric_ce(
            c * batch.image_proj @ batch.teacher_text.t(),
            c * batch.text_proj @ batch.teacher_image.t(),
            batch.labels(),
        )


class CRDConfig(ObjectiveConfig):
    """``crd``: KL between the teacher's and the student's in-batch logit distributions (weight 1)."""

    temperature: float = Field(default=1.0, gt=0, description="CLIP-KD uses 1; the KL is scaled by T²")


@CLIPKD_OBJECTIVES.register("crd")
class CRDObjective(CaptionObjective):
    """Contrastive relational distillation (``ckd`` in CLIP-KD's code).

    ``T² · (KL(σ(zT/T) ‖ σ(zS/T)) + KL(σ(zTᵀ/T) ‖ σ(zSᵀ/T))) / 2``, each KL summed over the N x N logits
    and divided by N (``batchmean``); ``zS = λS · image textᵀ``, ``zT = λT · t_image t_textᵀ``, diagonal
    included; the rows of ``zᵀ`` are the text-to-image distributions.
    """

    Config = CRDConfig
    uses_student_logits = True

    def __init__(self, cfg: CRDConfig) -> None:
        super().__init__(cfg)
        self.temperature = cfg.temperature

    def _kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        tau = self.temperature
        log_p_s = F.log_softmax(student / tau, dim=1)
        log_p_t = F.log_softmax(teacher.detach() / tau, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * tau**2

    def forward(self, batch: CaptionBatch) -> Tensor:
        z_s, z_t = batch.student_logits(), batch.teacher_logits()
        return (self._kl(z_s, z_t) + self._kl(z_s.t(), z_t.t())) / 2
