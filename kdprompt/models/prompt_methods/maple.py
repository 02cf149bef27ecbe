"""MaPLe (CVPR 2023): deep text prompts coupled to vision prompts by one linear map per depth.

Its loss is cross-entropy on the prompted logits (the :class:`PromptLearner` default).
Reference: muzairkhattak/multimodal-prompt-learning ``trainers/maple.py`` (MultiModalPromptLearner).
"""

from __future__ import annotations

import copy
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
    # MaPLe's configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: N_CTX 2, CTX_INIT "a photo of a",
    # so "a photo" is learned and "of a" stays fixed text.
    ctx_init: str | None = Field(
        default="a photo of a",
        description="phrase initialising the text context: its first n_ctx tokens are learned, the rest stay text",
    )


@PROMPT_METHODS.register("maple")
class CoupledPrompts(PromptLearner):
    """MaPLe: deep text prompts, and vision prompts made from them by one linear coupling per depth.

    The couplings map the text width to the vision width of the model at hand. As in MaPLe, the first
    depth's coupling (its ``proj``) has its own initialisation and the deeper ones start as copies of one
    initialised layer (``_get_clones(single_layer, PROMPT_DEPTH - 1)``), so at depth 9 there are 9.
    """

    Config = MaPLeConfig

    def __init__(self, cfg: MaPLeConfig, clip: LoadedClip, text_tower: Any, vision_tower: Any) -> None:
        super().__init__()
        layers = min(text_tower.num_layers, vision_tower.num_layers)
        check_depth(cfg.depth, layers, "method.depth")
        ctx, self.prefix = phrase_context(
            cfg.ctx_init, cfg.n_ctx, clip.tokenizer, clip.model.token_embedding, "method"
        )
        first = nn.Linear(text_tower.width, vision_tower.width)
        deep_text = deep_prompts(cfg.n_ctx, cfg.depth - 1, text_tower.width)
        shared = nn.Linear(text_tower.width, vision_tower.width)
        # Created in MaPLe's order (proj, deep text prompts, the layer to clone); the module keys stay
        # couplings.0..depth-1, so teachers saved before the cloned initialisation still load.
        self.ctx = nn.Parameter(ctx)
        self.deep_text = deep_text
        self.couplings = nn.ModuleList([first, *(copy.deepcopy(shared) for _ in range(cfg.depth - 1))])

    def text_prompts(self) -> list[Tensor | None]:
        return [self.ctx, *self.deep_text]

    def vision_prompts(self) -> list[Tensor | None]:
        return [coupling(p) for coupling, p in zip(self.couplings, self.text_prompts(), strict=True)]
