"""MaPLe (CVPR 2023): deep text prompts coupled to vision prompts by one linear map per depth.

Its loss is cross-entropy on the prompted logits (the :class:`PromptLearner` default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field
from torch import Tensor, nn

from kdprompt.models.prompt_methods.base import (
    PROMPT_METHODS,
    PromptLearner,
    PromptMethodConfig,
    check_depth,
    deep_prompts,
    phrase_context,
)

if TYPE_CHECKING:
    from kdprompt.models.loading import LoadedClip


class MaPLeConfig(PromptMethodConfig):
    """MaPLe: deep text prompts coupled to vision prompts by per-depth linear maps."""

    name: Literal["maple"] = "maple"
    n_ctx: int = Field(default=2, ge=1)
    depth: int = Field(
        default=9, ge=1, description="blocks receiving prompts in both towers (1 = input only)"
    )
    ctx_init: str | None = Field(default="a photo", description="phrase initialising the text context")


@PROMPT_METHODS.register("maple")
class CoupledPrompts(PromptLearner):
    """MaPLe: deep text prompts, and vision prompts made from them by one linear coupling per depth.

    The couplings map the text width to the vision width of the model at hand.
    """

    Config = MaPLeConfig

    def __init__(self, cfg: MaPLeConfig, clip: LoadedClip, text_tower: Any, vision_tower: Any) -> None:
        super().__init__()
        layers = min(text_tower.num_layers, vision_tower.num_layers)
        check_depth(cfg.depth, layers, "method.depth")
        ctx, self.prefix = phrase_context(
            cfg.ctx_init, cfg.n_ctx, clip.tokenizer, clip.model.token_embedding, "method"
        )
        self.ctx = nn.Parameter(ctx)
        self.deep_text = deep_prompts(cfg.n_ctx, cfg.depth - 1, text_tower.width)
        self.couplings = nn.ModuleList(
            nn.Linear(text_tower.width, vision_tower.width) for _ in range(cfg.depth)
        )

    def text_prompts(self) -> list[Tensor | None]:
        return [self.ctx, *self.deep_text]

    def vision_prompts(self) -> list[Tensor | None]:
        return [coupling(p) for coupling, p in zip(self.couplings, self.text_prompts(), strict=True)]
