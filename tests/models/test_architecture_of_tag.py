"""``create_clip(load_weights=False)`` with an open_clip tag: the tag's architecture, random weights, no network."""

from __future__ import annotations

import open_clip

from kdprompt.models.loading import create_clip
from kdprompt.models.spec import ModelSpec


def test_openai_tag_shapes_the_architecture_without_weights():
    # Was a TypeError (force_preprocess_cfg passed twice to open_clip) for every tag: what
    # `kdprompt bench distill --real-size` and load_student of a tag-pretrained student go through.
    clip = create_clip(ModelSpec(name="ViT-B-32", pretrained="openai"), load_weights=False)
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    cfg = clip.model.visual.preprocess_cfg
    assert tuple(cfg["mean"]) == tuple(tag["mean"]) and cfg["interpolation"] == tag["interpolation"]
    block = clip.model.visual.transformer.resblocks[0]
    assert isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU)  # the openai tag's activation
