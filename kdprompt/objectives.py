"""Training objectives, by name.

Stage one: PromptSRC's self-regulating terms (``promptsrc_losses``) and Gaussian prompt aggregation
weights. Stage two's distillation objectives (kl, fd, icl, crd) join this module with the student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_zero_shot_to_prompted(prompted_logits: Tensor, zero_shot_logits: Tensor) -> Tensor:
    """KL(zero-shot || prompted) over classes, summed and divided by the number of logits (PromptSRC)."""
    return (
        F.kl_div(
            F.log_softmax(prompted_logits, dim=-1),
            F.log_softmax(zero_shot_logits, dim=-1),
            reduction="sum",
            log_target=True,
        )
        / prompted_logits.numel()
    )


def promptsrc_losses(
    *,
    logits: Tensor,
    labels: Tensor,
    text_features: Tensor,
    frozen_text_features: Tensor,
    image_features: Tensor,
    frozen_image_features: Tensor,
    zero_shot_logits: Tensor,
    weights: dict[str, float],
) -> dict[str, Tensor]:
    """PromptSRC's loss terms (already weighted) and their sum under ``"loss"``.

    Args:
        logits: prompted logits (B x C).
        labels: class indices (B,).
        text_features / frozen_text_features: normalised prompted / frozen template-ensemble class features (C x D).
        image_features / frozen_image_features: normalised prompted / frozen image features (B x D).
        zero_shot_logits: the frozen model's logits (B x C).
        weights: ``ce``, ``text``, ``image``, ``kl``.
    """
    terms = {
        "ce": weights["ce"] * F.cross_entropy(logits, labels),
        "text_l1": weights["text"] * F.l1_loss(text_features, frozen_text_features, reduction="mean"),
        "image_l1": weights["image"] * F.l1_loss(image_features, frozen_image_features, reduction="mean"),
        "kl": weights["kl"] * kl_zero_shot_to_prompted(logits, zero_shot_logits),
    }
    terms["loss"] = sum(terms.values())
    return terms


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's aggregation weights: a Gaussian pdf at epochs 1..E, normalised to sum to 1."""
    pdf = [
        math.exp(-((e - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi))
        for e in range(1, epochs + 1)
    ]
    total = sum(pdf)
    if total <= 0 or not math.isfinite(total):
        # Every epoch is many std away from the mean: fall back to the last epoch alone.
        return [0.0] * (epochs - 1) + [1.0]
    return [p / total for p in pdf]


@torch.no_grad()
def accumulate_gpa(
    aggregate: dict[str, Tensor] | None, state: dict[str, Tensor], weight: float
) -> dict[str, Tensor]:
    """``aggregate + weight * state`` over a state dict (starting from nothing)."""
    scaled = {k: v.detach().float().cpu() * weight for k, v in state.items()}
    if aggregate is None:
        return scaled
    return {k: aggregate[k] + scaled[k] for k in scaled}
