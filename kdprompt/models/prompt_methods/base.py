"""What a prompt method is: a learner of prompts for a frozen CLIP that owns its training loss.

A method is one file: a :class:`PromptLearner` subclass with a ``Config`` (a pydantic model tagged by
``name: Literal["x"]``), registered with ``@PROMPT_METHODS.register("x")``. The teacher loop calls only
this interface: ``prepare_training`` once, ``training_loss`` per batch, and an optional
:class:`PromptAggregation` at each epoch end; it never tests a method's name.

A learner owns only the learned tensors. It hands the prompted towers one prompt per depth: the text
context replaces the tokens right after the start token (initialised from a phrase such as
"a photo of a", so that at initialisation the prompted text equals the frozen model's), and the
vision prompts are appended after the patch tokens and replaced at each deeper block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdprompt.config.base import StrictModel
from kdprompt.errors import KdpromptError
from kdprompt.registry import Registry

PROMPT_INIT_STD = 0.02

PROMPT_METHODS: Registry[type[PromptLearner]] = Registry("prompt method")


def phrase_context(
    phrase: str | None,
    n_ctx: int,
    tokenizer: Callable[[list[str]], Tensor],
    token_embedding: nn.Embedding,
    field: str,
) -> tuple[Tensor, str]:
    """Initial text context vectors (n_ctx, width) and the prompt prefix that holds their place.

    With a phrase, the context is the embeddings of the phrase's first n_ctx tokens and the prefix is
    the whole phrase, so "{prefix} {class}." tokenises with those tokens exactly where the context goes
    and any further phrase tokens stay fixed text ("a photo of a" with n_ctx 2: "[v1 v2] of a {class}.").
    Without one, the context is N(0, 0.02) and the prefix is n_ctx "X" placeholders (CoOp's convention).

    Raises:
        KdpromptError: the phrase has fewer tokens than n_ctx.
    """
    width = token_embedding.weight.shape[1]
    if not phrase:
        return torch.randn(n_ctx, width) * PROMPT_INIT_STD, " ".join(["X"] * n_ctx)
    tokens = tokenizer([phrase])[0]
    n_phrase = int(tokens.argmax()) - 1  # tokens between the start token and the EOT (the largest id)
    # MaPLe and PromptSRC both take `embedding[0, 1 : 1 + n_ctx]` of the tokenised CTX_INIT and keep the
    # whole phrase as `prompt_prefix` (multimodal-prompt-learning trainers/maple.py and PromptSRC
    # trainers/promptsrc.py, `if ctx_init and n_ctx <= 4`). A phrase shorter than n_ctx would make the
    # context swallow the class name's tokens there, so it is refused here instead.
    if n_phrase < n_ctx:
        raise KdpromptError(
            f"{field}.ctx_init {phrase!r} is {n_phrase} tokens but the context length is {n_ctx}; "
            f"set the context length to at most {n_phrase} or pick a phrase of at least {n_ctx} tokens"
        )
    with torch.no_grad():
        ctx = token_embedding(tokens[1 : 1 + n_ctx].to(token_embedding.weight.device)).float().cpu()
    return ctx.clone(), phrase


def deep_prompts(n: int, count: int, width: int) -> nn.ParameterList:
    """``count`` prompts of ``n`` tokens of ``width``, each N(0, 0.02)."""
    return nn.ParameterList([nn.Parameter(torch.randn(n, width) * PROMPT_INIT_STD) for _ in range(count)])


def check_depth(depth: int, layers: int, field: str) -> None:
    """Refuse a prompt depth the tower cannot take, naming the recipe field."""
    if not 1 <= depth <= layers:
        raise KdpromptError(f"{field} is {depth}, but the tower has {layers} blocks; use 1..{layers}")


class FrozenClip(Protocol):
    """What a method's loss may use of the prompted CLIP it trains in (kdprompt.models.teacher.PromptedClip)."""

    clip_model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]

    @property
    def device(self) -> torch.device: ...

    def frozen_image_features(self, images: Tensor) -> Tensor:
        """The frozen CLIP's L2-normalised image features (no prompts)."""
        ...


@dataclass
class TeacherOutputs:
    """One teacher training batch after the prompted forward pass.

    Attributes:
        images: the augmented batch (B x 3 x H x W).
        labels: class indices (B,).
        image_features / text_features: prompted, L2-normalised (B x D / C x D).
        logits: ``logit_scale · image_features @ text_featuresᵀ`` (B x C).
        logit_scale: the frozen CLIP's exponentiated logit scale.
    """

    images: Tensor
    labels: Tensor
    image_features: Tensor
    text_features: Tensor
    logits: Tensor
    logit_scale: Tensor


class PromptAggregation:
    """State a method keeps across epochs to build the prompts it ships (PromptSRC's GPA).

    It is checkpointed with the run (``state``/``load``) so that resume does not lose it.
    """

    def epoch_end(self, finished_epoch: int, learner_state: dict[str, Tensor]) -> None:
        """Fold in the learner's state after the 1-based epoch ``finished_epoch``."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """Tensors to checkpoint."""
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        """Numbers to checkpoint (JSON-able)."""
        raise NotImplementedError

    def load(self, tensors: dict[str, Tensor], counters: dict[str, Any]) -> None:
        """Restore what :meth:`tensors` and :meth:`counters` saved."""
        raise NotImplementedError

    def result(self) -> dict[str, Tensor] | None:
        """The aggregated learner state, or None when nothing was aggregated."""
        raise NotImplementedError


class PromptMethodConfig(StrictModel):
    """Base of a prompt method's recipe config (``method:``); subclasses set ``name: Literal[...]``."""

    name: str


class PromptLearner(nn.Module):
    """Learned prompts for both towers. Subclasses fill ``text_prompts`` / ``vision_prompts``.

    The default loss is cross-entropy on the prompted logits (MaPLe's); methods with more terms
    override :meth:`training_loss`.
    """

    Config: ClassVar[type[PromptMethodConfig]] = PromptMethodConfig
    prefix: str

    def prepare_training(self, model: FrozenClip, classnames: list[str]) -> None:
        """Compute what the loss needs once before training (e.g. frozen text features); default nothing."""

    def training_loss(self, model: FrozenClip, out: TeacherOutputs) -> dict[str, Tensor]:
        """The weighted loss terms of one batch and their sum under ``"loss"``."""
        return {"loss": F.cross_entropy(out.logits, out.labels)}

    def aggregation(self, epochs: int) -> PromptAggregation | None:
        """A fresh aggregation over ``epochs`` epochs, or None when the method ships its last state."""
        return None

    def text_prompts(self) -> list[Tensor | None]:
        """Per-depth text prompts: [0] replaces the context tokens, [d] the same positions before block d."""
        raise NotImplementedError

    def vision_prompts(self) -> list[Tensor | None]:
        """Per-depth vision prompts: [0] appended after the patch tokens, [d] replaces them before block d."""
        raise NotImplementedError
