"""Training objectives, by name.

Stage one: PromptSRC's self-regulating terms (``promptsrc_losses``) and Gaussian prompt aggregation
weights. Stage two: the distillation objectives (kl, fd, icl, crd) in
``OBJECTIVES`` and their weighted combination ``DistillObjectives``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdprompt.errors import KdpromptError
from kdprompt.registry import Registry

if TYPE_CHECKING:  # annotations only: stage one imports this module without the recipe models
    from kdprompt.config import (
        CRDObjectiveConfig,
        FDObjectiveConfig,
        ICLObjectiveConfig,
        KLObjectiveConfig,
        ObjectivesConfig,
    )


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


# ================================================================================================
# Stage two: distillation objectives (DESIGN.md §5), all on L2-normalised features.
# ================================================================================================


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


# name -> nn.Module class built as ``cls(config)``; forward(batch) gives the UNweighted scalar.
OBJECTIVES: Registry[type[nn.Module]] = Registry("objective")


@OBJECTIVES.register("kl")
class KLObjective(nn.Module):
    """``τ² · KL(softmax(zT/τ) ‖ softmax(zS/τ))`` over the cached classes (PromptKD)."""

    def __init__(self, cfg: KLObjectiveConfig) -> None:
        super().__init__()
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


@OBJECTIVES.register("fd")
class FDObjective(nn.Module):
    """Mean squared error between student and teacher features over all B·D elements (CLIP-KD FD)."""

    def __init__(self, cfg: FDObjectiveConfig) -> None:
        super().__init__()

    def forward(self, batch: DistillBatch) -> Tensor:
        """``mean((s - t)²)``."""
        return F.mse_loss(batch.student, batch.teacher)


@OBJECTIVES.register("icl")
class ICLObjective(nn.Module):
    """Cross-entropy of ``scale · s tᵀ`` against the diagonal: student anchors, teacher contrasts (CLIP-KD ICL).

    ``scale = exp(log_scale)`` clamped at ``1 / min_temperature``; ``log_scale`` is a learnable
    parameter starting at ``log(1 / init_temperature)``. CLIP-KD's released code used the log-space
    parameter directly as the scale; exponentiating it is what the method intends.
    """

    def __init__(self, cfg: ICLObjectiveConfig) -> None:
        super().__init__()
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


@OBJECTIVES.register("crd")
class CRDObjective(nn.Module):
    """KL between teacher and student in-batch relation distributions (CLIP-KD CRD, image side).

    For each anchor k, ``p[k] = softmax over j ≠ k of (f_k·f_j / τ)``, from ``t`` for the teacher and
    ``s`` for the student; the loss is ``Σ_k KL(p_T[k] ‖ p_S[k]) / B``.
    """

    def __init__(self, cfg: CRDObjectiveConfig) -> None:
        super().__init__()
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
                f"objective crd relates each image to the others in its batch and needs a batch of at least 2, "
                f"got {b}; raise train.batch_size or drop crd"
            )
        tau = self.temperature
        rel_t = self._off_diagonal(batch.teacher @ batch.teacher.t() / tau)
        rel_s = self._off_diagonal(batch.student @ batch.student.t() / tau)
        total = F.kl_div(
            F.log_softmax(rel_s, dim=-1), F.log_softmax(rel_t, dim=-1), reduction="sum", log_target=True
        )
        return total / b


class DistillObjectives(nn.Module):
    """The objectives a recipe names, with their weights; forward gives weighted terms and their sum.

    The objective modules live in an ``nn.ModuleDict`` so that learnable state (ICL's temperature)
    trains with the student and is saved and restored with it.
    """

    def __init__(self, cfg: ObjectivesConfig) -> None:
        super().__init__()
        enabled = {
            name: getattr(cfg, name) for name in type(cfg).model_fields if getattr(cfg, name) is not None
        }
        if not enabled:
            raise KdpromptError("name at least one objective under `objectives:` (kl, fd, icl, crd)")
        self.terms = nn.ModuleDict({name: OBJECTIVES.get(name)(sub) for name, sub in enabled.items()})
        self.weights = {name: float(sub.weight) for name, sub in enabled.items()}

    @property
    def names(self) -> list[str]:
        """Enabled objective names, in config order."""
        return list(self.terms.keys())

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        """Each enabled objective's weighted value, plus their sum under ``"loss"``."""
        # Logits at λ ≈ 100 lose most of their precision in bf16/fp16, so the objectives run in
        # float32 with autocast off whatever the training loop's mixed precision.
        device_type = batch.student.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            batch = batch.float32()
            out = {name: self.weights[name] * term(batch) for name, term in self.terms.items()}
        out["loss"] = sum(out.values())
        return out
