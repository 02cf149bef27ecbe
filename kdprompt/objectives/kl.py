"""``kl``: PromptKD's logit distillation over the cached classes."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdprompt.objectives.base import OBJECTIVES, DistillBatch, Objective, ObjectiveConfig


class KLObjectiveConfig(ObjectiveConfig):
    """``kl``: τ² · KL(softmax(zT/τ) ‖ softmax(zS/τ)) over the cached classes (PromptKD)."""

    temperature: float = Field(default=1.0, gt=0)
    reduction: Literal["batchmean", "mean"] = Field(
        default="batchmean", description="batchmean: sum / B; mean: sum / (B·C), PromptKD's own (weight 1000)"
    )


@OBJECTIVES.register("kl")
class KLObjective(Objective):
    """``τ² · KL(softmax(zT/τ) ‖ softmax(zS/τ))`` over the cached classes (PromptKD)."""

    Config = KLObjectiveConfig

    def __init__(self, cfg: KLObjectiveConfig) -> None:
        super().__init__(cfg)
        self.temperature = cfg.temperature
        self.reduction = cfg.reduction

    def forward(self, batch: DistillBatch) -> Tensor:
        """Summed KL divided by B (``batchmean``) or by B·C (``mean``, PromptKD's normalisation)."""
        tau = self.temperature
        z_t, z_s = batch.logits()
        total = F.kl_div(
            F.log_softmax(z_s / tau, dim=-1),
            F.log_softmax(z_t / tau, dim=-1),
            reduction="sum",
            log_target=True,
        )
        denominator = z_s.shape[0] if self.reduction == "batchmean" else z_s.numel()
        return total * tau**2 / denominator
