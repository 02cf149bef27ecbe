"""PromptSRC (ICCV 2023): independent deep vision and text prompts, self-regulating losses, GPA.

Loss = CE + 25 · L1(text, frozen template-ensemble text) + 10 · L1(image, frozen image)
+ KL(zero-shot ‖ prompted); the shipped prompts are a Gaussian-weighted average over epochs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdprompt.config.base import StrictModel
from kdprompt.models.prompt_methods.base import (
    PROMPT_METHODS,
    FrozenClip,
    PromptAggregation,
    PromptLearner,
    PromptMethodConfig,
    TeacherOutputs,
    check_depth,
    deep_prompts,
    phrase_context,
)
from kdprompt.models.templates import template_set, text_classifier

if TYPE_CHECKING:
    from kdprompt.models.loading import LoadedClip


class GPAConfig(StrictModel):
    """PromptSRC's Gaussian prompt aggregation: per-epoch weights from a Gaussian over epoch numbers."""

    enabled: bool = True
    mean: float = Field(default=15.0, description="epoch (1-based) at the Gaussian's peak")
    std: float = Field(default=1.0, gt=0)


class PromptSRCConfig(PromptMethodConfig):
    """PromptSRC: independent deep vision and text prompts with self-regulating losses."""

    name: Literal["promptsrc"] = "promptsrc"
    n_ctx_text: int = Field(default=4, ge=1)
    n_ctx_vision: int = Field(default=4, ge=1)
    text_depth: int = Field(default=9, ge=1, description="blocks receiving text prompts (1 = input only)")
    vision_depth: int = Field(default=9, ge=1, description="blocks receiving vision prompts (1 = input only)")
    ctx_init: str | None = Field(default="a photo of a", description="phrase initialising the text context")
    ce_weight: float = Field(default=1.0, ge=0)
    text_loss_weight: float = Field(
        default=25.0, ge=0, description="L1 to frozen template-ensemble text features"
    )
    image_loss_weight: float = Field(default=10.0, ge=0, description="L1 to frozen image features")
    kl_weight: float = Field(default=1.0, ge=0, description="KL(zero-shot || prompted) logits")
    templates: Literal["simple", "ensemble", "promptsrc"] = Field(
        default="ensemble",
        description="templates of the frozen text features the text L1 pulls towards; promptsrc: "
        "PromptSRC's own 60 (trainers/imagenet_templates.py), raw features averaged",
    )
    gpa: GPAConfig = GPAConfig()


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
    """``aggregate + weight * state`` over a state dict (starting from nothing), in float64.

    Early epochs far from the Gaussian's mean get weights below float32's normal range (epoch 1 at
    mean 15, std 1: 1.1e-43); in float32 a run that stops there would ship prompts off by ~15%.
    """
    scaled = {k: v.detach().double().cpu() * weight for k, v in state.items()}
    if aggregate is None:
        return scaled
    return {k: aggregate[k] + scaled[k] for k in scaled}


class GaussianPromptAggregation(PromptAggregation):
    """Σ_e w_e · state_e over finished epochs, with :func:`gaussian_epoch_weights`; normalised by the weight
    actually accumulated (``train.max_steps`` may end training before the Gaussian's mass)."""

    def __init__(self, epochs: int, mean: float, std: float) -> None:
        self.weights = gaussian_epoch_weights(epochs, mean, std)
        self.aggregate: dict[str, Tensor] | None = None
        self.total = 0.0

    def epoch_end(self, finished_epoch: int, learner_state: dict[str, Tensor]) -> None:
        """Add ``w_e · state`` for the 1-based epoch ``finished_epoch``."""
        if finished_epoch <= len(self.weights):
            weight = self.weights[finished_epoch - 1]
            self.aggregate = accumulate_gpa(self.aggregate, learner_state, weight)
            self.total += weight

    def tensors(self) -> dict[str, Tensor]:
        """The running weighted sum."""
        return dict(self.aggregate or {})

    def counters(self) -> dict[str, Any]:
        """The weight accumulated so far."""
        return {"gpa_weight": self.total}

    def load(self, tensors: dict[str, Tensor], counters: dict[str, Any]) -> None:
        """Restore a checkpointed aggregation."""
        self.aggregate = tensors or None
        self.total = float(counters.get("gpa_weight", 0.0))

    def result(self) -> dict[str, Tensor] | None:
        """The weighted average, or None before any weight was accumulated."""
        if self.aggregate is None or self.total <= 0:
            return None
        return {k: (v / self.total).float() for k, v in self.aggregate.items()}


@PROMPT_METHODS.register("promptsrc")
class IndependentPrompts(PromptLearner):
    """PromptSRC (IVLP): independent deep text and vision prompts.

    Args:
        n_ctx_text, n_ctx_vision: prompt tokens per depth in each tower.
        text_depth, vision_depth: how many blocks receive prompts (1 = input only).
        ctx_init: phrase that initialises the text context ("a photo of a"), or None for random.
    """

    Config = PromptSRCConfig

    def __init__(self, cfg: PromptSRCConfig, clip: LoadedClip, text_tower: Any, vision_tower: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self._frozen_text: Tensor | None = None
        check_depth(cfg.text_depth, text_tower.num_layers, "method.text_depth")
        check_depth(cfg.vision_depth, vision_tower.num_layers, "method.vision_depth")
        ctx, self.prefix = phrase_context(
            cfg.ctx_init, cfg.n_ctx_text, clip.tokenizer, clip.model.token_embedding, "method"
        )
        self.ctx = nn.Parameter(ctx)
        self.deep_text = deep_prompts(cfg.n_ctx_text, cfg.text_depth - 1, text_tower.width)
        self.vision = deep_prompts(cfg.n_ctx_vision, cfg.vision_depth, vision_tower.width)

    def text_prompts(self) -> list[Tensor | None]:
        return [self.ctx, *self.deep_text]

    def vision_prompts(self) -> list[Tensor | None]:
        return list(self.vision)

    def prepare_training(self, model: FrozenClip, classnames: list[str]) -> None:
        """The frozen CLIP's template-ensemble class features, which the text L1 pulls towards."""
        self._frozen_text = text_classifier(
            model.clip_model.encode_text,
            model.tokenizer,
            classnames,
            template_set(self.cfg.templates),
            device=model.device,
        )

    def training_loss(self, model: FrozenClip, out: TeacherOutputs) -> dict[str, Tensor]:
        """PromptSRC's weighted terms: CE, text L1, image L1 and KL(zero-shot ‖ prompted)."""
        if self._frozen_text is None:
            raise RuntimeError("call prepare_training before training_loss")
        frozen_text = self._frozen_text.to(out.text_features.device)
        frozen_image = model.frozen_image_features(out.images)
        return promptsrc_losses(
            logits=out.logits,
            labels=out.labels,
            text_features=out.text_features,
            frozen_text_features=frozen_text,
            image_features=out.image_features,
            frozen_image_features=frozen_image,
            zero_shot_logits=out.logit_scale * frozen_image @ frozen_text.T,
            weights={
                "ce": self.cfg.ce_weight,
                "text": self.cfg.text_loss_weight,
                "image": self.cfg.image_loss_weight,
                "kl": self.cfg.kl_weight,
            },
        )

    def aggregation(self, epochs: int) -> PromptAggregation | None:
        """Gaussian prompt aggregation over the run's epochs, when enabled."""
        gpa = self.cfg.gpa
        return GaussianPromptAggregation(epochs, gpa.mean, gpa.std) if gpa.enabled else None
