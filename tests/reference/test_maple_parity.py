"""MaPLe parity: kdprompt's CoupledPrompts against a re-implementation of the reference code.

The reference is muzairkhattak/multimodal-prompt-learning: ``trainers/maple.py`` (MultiModalPromptLearner:
the context from the first N_CTX token embeddings of CTX_INIT, ``construct_prompts`` = [SOS, ctx, suffix],
``proj`` for the first depth and ``_get_clones(single_layer, PROMPT_DEPTH - 1)`` for the deeper ones;
TextEncoder: EOT pooling) and ``clip/model.py`` (ResidualAttentionBlock_MaPLe: text prompts replace
positions 1..n_ctx, vision prompts replace the last n_ctx tokens, from the second block on;
VisionTransformer_MaPLe: ``proj(ctx)`` appended after the positional embedding, before ``ln_pre``).
It is written here from that code, on the tiny open_clip model's frozen modules, not with kdprompt's
helpers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.prompt_methods import MaPLeConfig
from kdprompt.models.teacher import PromptedClip
from kdprompt.models.towers import ReplacePrompts

CLASSES = ["red circle", "blue star", "green ring"]
N_CTX, DEPTH, CTX_INIT = 2, 3, "a photo of a"  # MaPLe's N_CTX and CTX_INIT; depth fits the 4-block model
TOL = 1e-6


class ReferencePromptLearner(nn.Module):
    """MultiModalPromptLearner's parameters, buffers and forward (trainers/maple.py)."""

    def __init__(self, clip_model: nn.Module, tokenizer, classnames: list[str], vision_width: int) -> None:
        super().__init__()
        ctx_dim = clip_model.ln_final.weight.shape[0]
        with torch.no_grad():
            init_embedding = clip_model.token_embedding(tokenizer([CTX_INIT]))
        ctx_vectors = init_embedding[0, 1 : 1 + N_CTX, :]
        self.proj = nn.Linear(ctx_dim, vision_width)
        self.ctx = nn.Parameter(ctx_vectors)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(N_CTX, ctx_dim)) for _ in range(DEPTH - 1)]
        )
        for single_para in self.compound_prompts_text:
            nn.init.normal_(single_para, std=0.02)
        single_layer = nn.Linear(ctx_dim, vision_width)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single_layer) for _ in range(DEPTH - 1)]
        )
        self.tokenized_prompts = tokenizer([CTX_INIT + " " + name + "." for name in classnames])
        with torch.no_grad():
            embedding = clip_model.token_embedding(self.tokenized_prompts)
        self.register_buffer("token_prefix", embedding[:, :1, :])
        self.register_buffer("token_suffix", embedding[:, 1 + N_CTX :, :])

    def forward(self) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        ctx = self.ctx.unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        visual_deep = [
            layer(self.compound_prompts_text[i]) for i, layer in enumerate(self.compound_prompt_projections)
        ]
        return prompts, self.proj(self.ctx), list(self.compound_prompts_text), visual_deep


def reference_text_features(
    clip_model: nn.Module, prompts: Tensor, tokens: Tensor, deep: list[Tensor]
) -> Tensor:
    """TextEncoder.forward with ResidualAttentionBlock_MaPLe's text-side replacement."""
    x = prompts + clip_model.positional_embedding
    counter = 0
    for i, block in enumerate(clip_model.transformer.resblocks):
        if i > 0 and counter < len(deep):
            ctx = deep[counter].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + N_CTX :]], dim=1)
            counter += 1
        x = block(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip_model.text_projection
    return x / x.norm(dim=-1, keepdim=True)


def reference_image_features(
    visual: nn.Module, images: Tensor, shared_ctx: Tensor, deep: list[Tensor]
) -> Tensor:
    """VisionTransformer_MaPLe.forward with ResidualAttentionBlock_MaPLe's vision-side replacement."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = torch.cat([x, shared_ctx.expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    counter = 0
    for i, block in enumerate(visual.transformer.resblocks):
        if i > 0 and counter < len(deep):
            x = torch.cat([x[:, : x.shape[1] - N_CTX], deep[counter].expand(x.shape[0], -1, -1)], dim=1)
            counter += 1
        x = block(x)
    x = visual.ln_post(x[:, 0, :]) @ visual.proj
    return x / x.norm(dim=-1, keepdim=True)


def _load_into_reference(ref: ReferencePromptLearner, learner: nn.Module) -> None:
    """Copy kdprompt's learned tensors into the reference layout (couplings[0] is MaPLe's ``proj``)."""
    with torch.no_grad():
        ref.ctx.copy_(learner.ctx)
        for mine, theirs in zip(learner.deep_text, ref.compound_prompts_text, strict=True):
            theirs.copy_(mine)
        ref.proj.load_state_dict(learner.couplings[0].state_dict())
        for mine, theirs in zip(learner.couplings[1:], ref.compound_prompt_projections, strict=True):
            theirs.load_state_dict(mine.state_dict())


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip(ModelSpec(name="kd-tiny-teacher"))


def _pair(clip, seed: int) -> tuple[PromptedClip, ReferencePromptLearner]:
    cfg = MaPLeConfig(n_ctx=N_CTX, depth=DEPTH, ctx_init=CTX_INIT)
    torch.manual_seed(seed)
    model = PromptedClip(clip, cfg, name="maple")
    torch.manual_seed(seed)
    ref = ReferencePromptLearner(clip.model, clip.tokenizer, CLASSES, model.vision_tower.width)
    return model, ref


def test_initialisation_matches_the_reference_draw_for_draw(clip):
    """Same seed, same draws: the context, deep text prompts, ``proj`` and the cloned couplings."""
    model, ref = _pair(clip, seed=7)
    learner = model.learner
    assert torch.equal(learner.ctx, ref.ctx)
    for mine, theirs in zip(learner.deep_text, ref.compound_prompts_text, strict=True):
        assert (mine - theirs).abs().max().item() <= TOL
    assert torch.equal(learner.couplings[0].weight, ref.proj.weight)
    assert torch.equal(learner.couplings[0].bias, ref.proj.bias)
    for mine, theirs in zip(learner.couplings[1:], ref.compound_prompt_projections, strict=True):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)


def test_text_prompt_layout_matches_construct_prompts(clip):
    model, ref = _pair(clip, seed=1)
    with torch.no_grad():
        for p in model.learner.parameters():
            p.add_(0.1 * torch.randn_like(p))
        _load_into_reference(ref, model.learner)
        tokens = model.class_tokens(CLASSES)
        assert torch.equal(tokens, ref.tokenized_prompts)
        ours = ReplacePrompts(model.learner.text_prompts())(0, clip.model.token_embedding(tokens))
        prompts, *_ = ref()
    assert (ours - prompts).abs().max().item() <= TOL


def test_couplings_and_both_towers_match_the_reference_forward(clip):
    model, ref = _pair(clip, seed=2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in model.learner.parameters():
            p.add_(0.1 * torch.randn_like(p))
        _load_into_reference(ref, model.learner)
        prompts, shared_ctx, deep_text, deep_vision = ref()
        ours = model.learner.vision_prompts()
        assert (ours[0] - shared_ctx).abs().max().item() <= TOL
        for mine, theirs in zip(ours[1:], deep_vision, strict=True):
            assert (mine - theirs).abs().max().item() <= TOL
        text = reference_text_features(clip.model, prompts, ref.tokenized_prompts, deep_text)
        image = reference_image_features(clip.model.visual, images, shared_ctx, deep_vision)
        assert (model.class_features(CLASSES) - text).abs().max().item() <= TOL
        assert (model.encode_images(images) - image).abs().max().item() <= TOL
        # The prompts matter: without them the features differ by far more than the tolerance.
        frozen = clip.model.encode_text(ref.tokenized_prompts)
        assert (frozen / frozen.norm(dim=-1, keepdim=True) - text).abs().max().item() > 1e-3
