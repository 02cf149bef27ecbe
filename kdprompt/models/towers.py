"""open_clip towers run block by block, so that prompts can be appended or replaced at each depth.

A hook is ``hook(depth, x) -> x`` with ``x`` batch-first ``(B, tokens, width)``:

* vision: depth 0 after the positional embedding (and patch dropout), before ``ln_pre``; depth
  ``d >= 1`` before block ``d``. Tokens beyond the image's own (class + patches) are prompts and are
  dropped before pooling.
* text: depth 0 on the token embeddings before the positional embedding is added (CoOp-style
  context replacement); depth ``d >= 1`` before block ``d``. Pooling uses the token ids, so
  replaced embeddings keep the EOT position.

With no hook the towers reproduce ``model.encode_image`` / ``model.encode_text`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer, text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdprompt.errors import KdpromptError

PromptHook = Callable[[int, Tensor], Tensor]


def _self_attention(attn: nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """``attn(x, x, x, need_weights=False)[0]`` for a batch-first ``x``, the in-projection one matrix product.

    ``nn.MultiheadAttention`` turns a batch-first input sequence-first before its in-projection, and a
    linear layer on that strided view runs as a batched product over one weight copy per token: 15% of a
    ViT-B/16 block's forward + backward on CPU. The same projections and the same scaled dot-product
    attention in the contiguous layout give equal outputs and gradients (tested).
    """
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def _plain_block(block: nn.Module, attn_mask: Tensor | None) -> bool:
    """Whether :func:`_block_forward` computes exactly what ``block`` does: open_clip's self-attention
    block with a packed, bias-carrying projection, no attention dropout, and no mask or a float (L, L) one."""
    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock
        and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and attn.dropout == 0.0
        and (attn_mask is None or (attn_mask.dim() == 2 and attn_mask.is_floating_point()))
    )


def _block_forward(block: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` with :func:`_self_attention`."""
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None  # as the block's attention() casts it
    x = x + block.ls_1(_self_attention(block.attn, block.ln_1(x), mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _open_clip_block(block: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    return block(x, attn_mask=attn_mask)


def _run_block(transformer: nn.Module, block: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """Run one residual block as open_clip's Transformer.forward would (layout, checkpointing).

    With gradients, a plain block runs through :func:`_block_forward` (faster, equal); without, the block
    itself, whose attention then takes torch's fused inference path.
    """
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    grad = torch.is_grad_enabled()
    # _plain_block also requires a batch-first attention: a sequence-first transformer keeps open_clip's block.
    run = _block_forward if grad and _plain_block(block, attn_mask) else _open_clip_block
    if getattr(transformer, "grad_checkpointing", False) and grad:
        x = checkpoint(run, block, x, attn_mask, use_reentrant=False)
    else:
        x = run(block, x, attn_mask)
    if not batch_first:
        x = x.transpose(0, 1)
    return x


def _validate_hook(hook: PromptHook | None, num_layers: int, width: int) -> None:
    validate = getattr(hook, "validate", None)
    if validate is not None:
        validate(num_layers=num_layers, width=width)


class PromptedVisionTower(nn.Module):
    """An open_clip ViT image tower that calls a prompt hook at each depth.

    Args:
        model: a CLIP model (its ``visual`` is used) or an open_clip ``VisionTransformer``.
        name: the model's name, for error messages.

    Raises:
        KdpromptError: the image tower is not a plain open_clip ViT.
    """

    def __init__(self, model: nn.Module, name: str = "this model") -> None:
        super().__init__()
        visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", model)
        fix = "use a ViT model, or `adaptation: full` for a student"
        if not isinstance(visual, VisionTransformer):
            raise KdpromptError(
                f"prompt methods need a ViT image tower (open_clip VisionTransformer); {name} has "
                f"{type(visual).__name__}; {fix}"
            )
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            variant = (
                "attentional pooling" if visual.attn_pool is not None else f"pool_type {visual.pool_type!r}"
            )
            raise KdpromptError(
                f"prompt methods need a ViT image tower with class-token or average pooling; {name} has "
                f"{type(visual).__name__} with {variant}; {fix}"
            )
        self.visual = visual
        self.width: int = visual.conv1.out_channels
        self.num_layers: int = len(visual.transformer.resblocks)
        self.output_dim: int = visual.output_dim

    def forward(self, images: Tensor, hook: PromptHook | None = None) -> Tensor:
        """Encode ``images`` (B, 3, H, W) to features (B, output_dim), calling ``hook`` at each depth."""
        v = self.visual
        if hook is not None:
            _validate_hook(hook, self.num_layers, self.width)
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid**2, width)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        num_image_tokens = x.shape[1]
        if hook is not None:
            x = hook(0, x)
        x = v.ln_pre(x)
        for depth, block in enumerate(v.transformer.resblocks):
            if hook is not None and depth > 0:
                x = hook(depth, x)
            x = _run_block(v.transformer, block, x, None)
        # Prompt tokens sit after the image tokens: drop them so 'avg' pooling sees only patches
        # ('tok' takes position 0, and ln_post is per token, so this changes nothing else).
        x = x[:, :num_image_tokens]
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


class PromptedTextTower(nn.Module):
    """An open_clip text transformer that calls a prompt hook at each depth.

    Args:
        model: a CLIP model (its text parts are used), a CustomTextCLIP (its ``text``), or an
            open_clip ``TextTransformer``.
        name: the model's name, for error messages.

    Raises:
        KdpromptError: the text tower is not the standard open_clip text transformer.
    """

    def __init__(self, model: nn.Module, name: str = "this model") -> None:
        super().__init__()
        text = model if isinstance(model, TextTransformer) else getattr(model, "text", None)
        self._text: TextTransformer | None = None
        if text is not None:
            if not isinstance(text, TextTransformer) or text.cls_emb is not None:
                kind = type(text).__name__ + (
                    " with a class token (CoCa)" if isinstance(text, TextTransformer) else ""
                )
                raise KdpromptError(
                    f"prompt methods need the standard open_clip text transformer; {name} has {kind}; "
                    "use a CLIP model with a standard text tower"
                )
            self._text = text
            self.token_embedding = text.token_embedding
            self.positional_embedding = text.positional_embedding
            self.transformer = text.transformer
            self.ln_final = text.ln_final
            self.text_projection = text.text_projection
            self.pool_type: str = text.pool_type
            self.eos_id: int | None = text.eos_id
            self.causal = text.attn_mask is not None
            self.use_pad_mask = text.use_pad_mask
        elif all(
            hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        ):
            self.token_embedding = model.token_embedding
            self.positional_embedding = model.positional_embedding
            self.transformer = model.transformer
            self.ln_final = model.ln_final
            self.text_projection = model.text_projection
            self.pool_type = model.text_pool_type
            self.eos_id = getattr(model, "text_eos_id", None)
            self.causal = getattr(model, "attn_mask", None) is not None
            self.use_pad_mask = False
        else:
            raise KdpromptError(
                f"prompt methods need the standard open_clip text transformer; {name} has "
                f"{type(model).__name__} without one; use a CLIP model with a standard text tower"
            )
        self.width: int = self.token_embedding.embedding_dim
        self.num_layers: int = len(self.transformer.resblocks)
        self.context_length: int = self.positional_embedding.shape[0]
        proj = self.text_projection
        if proj is None:
            self.output_dim: int = self.width
        elif isinstance(proj, nn.Linear):
            self.output_dim = proj.out_features
        else:
            self.output_dim = proj.shape[1]

    def _attn_mask(self, tokens: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        n = tokens.shape[1]
        # Built per call rather than held as a buffer: a buffer shared with the CLIP model goes stale
        # when the model is moved with .to(); the values equal open_clip's build_causal_mask.
        mask = torch.full((n, n), float("-inf"), device=device).triu_(1) if self.causal else None
        if self.use_pad_mask and self._text is not None:
            pad = self._text._build_additive_mask(tokens, n, dtype)
            mask = pad if mask is None else mask.unsqueeze(0) + pad
        return mask

    def forward(
        self, tokens: Tensor, hook: PromptHook | None = None, token_embeddings: Tensor | None = None
    ) -> Tensor:
        """Encode ``tokens`` (B, context_length) to features (B, output_dim).

        Args:
            tokens: token ids; used for the embeddings (unless given) and always for pooling.
            hook: prompt hook called at each depth.
            token_embeddings: (B, context_length, width) embeddings to use instead of the tokens'.
        """
        if hook is not None:
            _validate_hook(hook, self.num_layers, self.width)
        cast_dtype = self.transformer.get_cast_dtype()
        if token_embeddings is None:
            x = self.token_embedding(tokens).to(cast_dtype)
        else:
            if token_embeddings.shape != (*tokens.shape, self.width):
                raise ValueError(
                    f"token_embeddings has shape {tuple(token_embeddings.shape)}; expected "
                    f"{(*tokens.shape, self.width)} for tokens of shape {tuple(tokens.shape)}"
                )
            x = token_embeddings.to(cast_dtype)
        if hook is not None:
            x = hook(0, x)
        x = x + self.positional_embedding.to(cast_dtype)
        attn_mask = self._attn_mask(tokens, x.dtype, x.device)
        for depth, block in enumerate(self.transformer.resblocks):
            if hook is not None and depth > 0:
                x = hook(depth, x)
            x = _run_block(self.transformer, block, x, attn_mask)
        x = self.ln_final(x)
        pooled = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled


def _as_prompt(p: Tensor, x: Tensor, depth: int) -> Tensor:
    """Broadcast a (n, W) or (B, n, W) prompt to x's batch and dtype, checking shapes."""
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(x.shape[0], -1, -1)
    elif p.dim() != 3 or p.shape[0] != x.shape[0]:
        raise ValueError(
            f"prompts at depth {depth} have shape {tuple(p.shape)}; expected (n, width) or "
            f"(batch={x.shape[0]}, n, width)"
        )
    if p.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"prompts at depth {depth} have width {p.shape[-1]}; the tower's width is {x.shape[-1]}"
        )
    return p.to(x.dtype)


class _PromptHook:
    """Shared validation of per-depth prompt lists."""

    def __init__(self, prompts: Sequence[Tensor | None]) -> None:
        self.prompts = list(prompts)
        for depth, p in enumerate(self.prompts):
            if p is not None and p.dim() not in (2, 3):
                raise ValueError(
                    f"prompts at depth {depth} have shape {tuple(p.shape)}; expected (n, width) or (batch, n, width)"
                )

    def _at(self, depth: int) -> Tensor | None:
        return self.prompts[depth] if depth < len(self.prompts) else None

    def validate(self, num_layers: int, width: int) -> None:
        """Check the prompts against a tower with ``num_layers`` blocks of ``width`` channels.

        Raises:
            KdpromptError: a prompt depth beyond the tower, or a width that is not the tower's.
        """
        deepest = max((d for d, p in enumerate(self.prompts) if p is not None), default=-1)
        if deepest >= num_layers:
            raise KdpromptError(
                f"prompts given for depth {deepest}, but the tower has {num_layers} blocks "
                f"(prompt depths 0..{num_layers - 1}); lower the prompt depth"
            )
        for depth, p in enumerate(self.prompts):
            if p is not None and p.shape[-1] != width:
                raise KdpromptError(
                    f"prompts at depth {depth} have width {p.shape[-1]}; the tower's width is {width}"
                )


class AppendPrompts(_PromptHook):
    """Vision prompts: append ``prompts[0]`` at depth 0, replace the last n tokens at deeper depths.

    ``prompts[d]`` is (n, W) or (B, n, W); ``None`` at depth ``d >= 1`` keeps what the previous
    block produced for the prompt tokens. All prompts must have the same n.
    """

    def __init__(self, prompts: Sequence[Tensor | None]) -> None:
        super().__init__(prompts)
        given = [p for p in self.prompts if p is not None]
        if given and self._at(0) is None:
            raise ValueError("deep vision prompts need prompts at depth 0 (they replace the appended tokens)")
        counts = {p.shape[-2] for p in given}
        if len(counts) > 1:
            raise ValueError(
                f"vision prompts must have the same number of tokens at every depth; got {sorted(counts)}"
            )
        self.n = counts.pop() if counts else 0

    def __call__(self, depth: int, x: Tensor) -> Tensor:
        p = self._at(depth)
        if p is None:
            return x
        p = _as_prompt(p, x, depth)
        if depth == 0:
            return torch.cat([x, p], dim=1)
        return torch.cat([x[:, : x.shape[1] - self.n], p], dim=1)


class ReplacePrompts(_PromptHook):
    """Text prompts: ``prompts[d]`` replaces token positions ``[start, start + n)`` at depth d.

    ``prompts[d]`` is (n, W) or (B, n, W); ``None`` keeps what the previous block produced.
    ``start=1`` puts the context right after the start-of-text token, as CoOp/PromptSRC/MaPLe do.
    """

    def __init__(self, prompts: Sequence[Tensor | None], start: int = 1) -> None:
        super().__init__(prompts)
        if start < 0:
            raise ValueError(f"start must be >= 0; got {start}")
        self.start = start

    def __call__(self, depth: int, x: Tensor) -> Tensor:
        p = self._at(depth)
        if p is None:
            return x
        p = _as_prompt(p, x, depth)
        end = self.start + p.shape[1]
        if end > x.shape[1]:
            raise ValueError(
                f"prompts at depth {depth} cover positions {self.start}..{end - 1}, but the sequence has "
                f"{x.shape[1]} tokens"
            )
        return torch.cat([x[:, : self.start], p, x[:, end:]], dim=1)
