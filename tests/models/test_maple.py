"""MaPLe's prompt layout ("[v1 v2] of a {class}."), context initialisation and coupling initialisation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.prompt_methods import MaPLeConfig, PromptSRCConfig
from kdprompt.models.teacher import PromptedClip, load_teacher, save_teacher
from kdprompt.models.towers import ReplacePrompts

CLASSES = ["red circle", "blue star"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip(ModelSpec(name="kd-tiny-teacher"))


def test_default_context_learns_the_first_two_words_and_keeps_of_a(clip):
    model = PromptedClip(clip, MaPLeConfig(depth=2), name="m")
    assert model.learner.prefix == "a photo of a"
    tokens = model.class_tokens(CLASSES)
    assert torch.equal(tokens, clip.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    embed = clip.model.token_embedding
    with torch.no_grad():
        # The context starts as the embeddings of "a photo" (positions 1..2 after the start token).
        assert torch.equal(model.learner.ctx, embed(tokens[0, 1:3]))
        model.learner.ctx.add_(1.0)
        x = ReplacePrompts(model.learner.text_prompts())(0, embed(tokens))
    assert torch.equal(x[:, 1:3], model.learner.ctx.expand(len(CLASSES), -1, -1))
    # Everything else, "of a {class}." included, is the phrase's own fixed token embeddings.
    assert torch.equal(x[:, :1], embed(tokens)[:, :1]) and torch.equal(x[:, 3:], embed(tokens)[:, 3:])


def test_input_only_maple_text_equals_the_frozen_template_at_init(clip):
    model = PromptedClip(clip, MaPLeConfig(depth=1), name="m")
    with torch.no_grad():
        frozen = F.normalize(
            clip.model.encode_text(clip.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1
        )
        assert (model.class_features(CLASSES) - frozen).abs().max().item() <= 1e-6


def test_deeper_couplings_start_as_copies_of_one_layer(clip):
    torch.manual_seed(3)
    couplings = PromptedClip(clip, MaPLeConfig(depth=4), name="m").learner.couplings
    assert len(couplings) == 4
    first, *deeper = couplings
    for c in deeper[1:]:
        assert torch.equal(c.weight, deeper[0].weight) and torch.equal(c.bias, deeper[0].bias)
        assert c.weight.data_ptr() != deeper[0].weight.data_ptr()  # copies, trained independently
    # MaPLe's first-depth `proj` is a separate layer with its own initialisation.
    assert not torch.equal(first.weight, deeper[0].weight)


def test_phrase_with_as_many_tokens_as_the_context_is_the_whole_prefix(clip):
    assert PromptedClip(clip, MaPLeConfig(ctx_init="a photo", depth=1), name="m").learner.prefix == "a photo"
    assert PromptedClip(clip, MaPLeConfig(ctx_init=None, depth=1), name="m").learner.prefix == "X X"
    promptsrc = PromptedClip(clip, PromptSRCConfig(text_depth=1, vision_depth=1), name="p").learner
    assert promptsrc.prefix == "a photo of a" and promptsrc.ctx.shape[0] == 4


def test_teacher_saved_with_the_old_maple_default_rebuilds_the_same_prompts(tmp_path, tiny_teacher_weights):
    spec = ModelSpec(name="kd-tiny-teacher", pretrained=tiny_teacher_weights)
    old = PromptedClip(create_clip(spec), MaPLeConfig(ctx_init="a photo", depth=2), name="old")
    with torch.no_grad():
        old.learner.ctx.add_(0.5)
    save_teacher(tmp_path, old, classnames=CLASSES, all_classnames=CLASSES, extra={})
    meta = json.loads((tmp_path / "teacher.json").read_text())
    assert meta["method"]["ctx_init"] == "a photo" and meta["prefix"] == "a photo"
    loaded = load_teacher(tmp_path)
    assert loaded.learner.prefix == "a photo"
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.class_features(CLASSES), old.class_features(CLASSES), atol=1e-6)
        assert torch.allclose(loaded.encode_images(images), old.encode_images(images), atol=1e-6)
