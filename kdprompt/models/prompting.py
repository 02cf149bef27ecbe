"""Prompt learners for a frozen CLIP: PromptSRC's independent deep prompts and MaPLe's coupled prompts.

A learner owns only the learned tensors. It hands the prompted towers one prompt per depth: the text
context replaces the tokens right after the start token (initialised from a phrase such as
"a photo of a", so that at initialisation the prompted text equals the frozen model's), and the
vision prompts are appended after the patch tokens and replaced at each deeper block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

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

    With a phrase, the context is the phrase's own token embeddings and the prefix is the phrase, so
    "{prefix} {class}." tokenises with the phrase tokens exactly where the context goes. Without one,
    the context is N(0, 0.02) and the prefix is n_ctx "X" placeholders (CoOp's convention).
    """
    width = token_embedding.weight.shape[1]
    if not phrase:
        return torch.randn(n_ctx, width) * PROMPT_INIT_STD, " ".join(["X"] * n_ctx)
    tokens = tokenizer([phrase])[0]
    eot = int(tokens.argmax())
    n_phrase = eot - 1
    if n_phrase != n_ctx:
        raise KdpromptError(
            f"{field}.ctx_init {phrase!r} is {n_phrase} tokens but the context length is {n_ctx}; "
            f"set the context length to {n_phrase} or pick a phrase of {n_ctx} tokens"
        )
    with torch.no_grad():
        ctx = token_embedding(tokens[1 : 1 + n_ctx].to(token_embedding.weight.device)).float().cpu()
    return ctx.clone(), phrase


def _deep(n: int, count: int, width: int) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(torch.randn(n, width) * PROMPT_INIT_STD) for _ in range(count)])


def check_depth(depth: int, layers: int, field: str) -> None:
    """Refuse a prompt depth the tower cannot take, naming the recipe field."""
    if not 1 <= depth <= layers:
        raise KdpromptError(f"{field} is {depth}, but the tower has {layers} blocks; use 1..{layers}")


class PromptLearner(nn.Module):
    """Learned prompts for both towers. Subclasses fill ``text_prompts`` / ``vision_prompts``."""

    prefix: str

    def text_prompts(self) -> list[Tensor | None]:
        """Per-depth text prompts: [0] replaces the context tokens, [d] the same positions before block d."""
        raise NotImplementedError

    def vision_prompts(self) -> list[Tensor | None]:
        """Per-depth vision prompts: [0] appended after the patch tokens, [d] replaces them before block d."""
        raise NotImplementedError


@PROMPT_METHODS.register("promptsrc")
class IndependentPrompts(PromptLearner):
    """PromptSRC (IVLP): independent deep text and vision prompts.

    Args:
        n_ctx_text, n_ctx_vision: prompt tokens per depth in each tower.
        text_depth, vision_depth: how many blocks receive prompts (1 = input only).
        ctx_init: phrase that initialises the text context ("a photo of a"), or None for random.
    """

    def __init__(self, cfg, clip, text_tower, vision_tower) -> None:
        super().__init__()
        check_depth(cfg.text_depth, text_tower.num_layers, "method.text_depth")
        check_depth(cfg.vision_depth, vision_tower.num_layers, "method.vision_depth")
        ctx, self.prefix = phrase_context(
            cfg.ctx_init, cfg.n_ctx_text, clip.tokenizer, clip.model.token_embedding, "method"
        )
        self.ctx = nn.Parameter(ctx)
        self.deep_text = _deep(cfg.n_ctx_text, cfg.text_depth - 1, text_tower.width)
        self.vision = _deep(cfg.n_ctx_vision, cfg.vision_depth, vision_tower.width)

    def text_prompts(self) -> list[Tensor | None]:
        return [self.ctx, *self.deep_text]

    def vision_prompts(self) -> list[Tensor | None]:
        return list(self.vision)


@PROMPT_METHODS.register("maple")
class CoupledPrompts(PromptLearner):
    """MaPLe: deep text prompts, and vision prompts made from them by one linear coupling per depth.

    The couplings map the text width to the vision width of the model at hand.
    """

    def __init__(self, cfg, clip, text_tower, vision_tower) -> None:
        super().__init__()
        layers = min(text_tower.num_layers, vision_tower.num_layers)
        check_depth(cfg.depth, layers, "method.depth")
        ctx, self.prefix = phrase_context(
            cfg.ctx_init, cfg.n_ctx, clip.tokenizer, clip.model.token_embedding, "method"
        )
        self.ctx = nn.Parameter(ctx)
        self.deep_text = _deep(cfg.n_ctx, cfg.depth - 1, text_tower.width)
        self.couplings = nn.ModuleList(
            nn.Linear(text_tower.width, vision_tower.width) for _ in range(cfg.depth)
        )

    def text_prompts(self) -> list[Tensor | None]:
        return [self.ctx, *self.deep_text]

    def vision_prompts(self) -> list[Tensor | None]:
        return [coupling(p) for coupling, p in zip(self.couplings, self.text_prompts(), strict=True)]
