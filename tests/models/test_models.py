"""Models: spec, loading/saving, and block-by-block towers that match open_clip exactly."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from kdprompt.errors import KdpromptError
from kdprompt.models import (
    AppendPrompts,
    ModelSpec,
    PromptedTextTower,
    PromptedVisionTower,
    ReplacePrompts,
    available_kdprompt_models,
    create_clip,
    resolve_model_name,
    save_clip_weights,
)

torch.set_num_threads(2)

TINY = ["kd-tiny-teacher", "kd-tiny-student"]


def _build(name: str):
    torch.manual_seed(0)
    return create_clip(ModelSpec(name=name))


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: _build(name) for name in [*TINY, "ViT-B-32"]}


def _images(loaded, n: int = 2) -> torch.Tensor:
    size = loaded.model.visual.image_size[0]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_kdprompt_configs_are_listed_and_resolved():
    assert set(TINY) <= set(available_kdprompt_models())
    for name in TINY:
        assert resolve_model_name(name) == name
    assert resolve_model_name("ViT-B/32") == "ViT-B-32"


@pytest.mark.parametrize("name", [*TINY, "ViT-B-32"])
def test_towers_match_encode_without_prompts(models, name):
    loaded = models[name]
    model = loaded.model
    assert not model.training
    images = _images(loaded)
    tokens = loaded.tokenizer(["a photo of a red circle.", "a blue square"])
    vision, text = PromptedVisionTower(model, name), PromptedTextTower(model, name)
    with torch.no_grad():
        assert _max_diff(vision(images), model.encode_image(images)) <= 1e-6
        assert _max_diff(vision(images, hook=AppendPrompts([])), model.encode_image(images)) <= 1e-6
        assert _max_diff(text(tokens), model.encode_text(tokens)) <= 1e-6
        assert _max_diff(text(tokens, hook=ReplacePrompts([None])), model.encode_text(tokens)) <= 1e-6
    assert vision.output_dim == text.output_dim == model.text_projection.shape[1]
    assert text.context_length == tokens.shape[1]


def test_vision_avg_pool_ignores_prompt_tokens():
    torch.manual_seed(0)
    cfg = copy.deepcopy(open_clip.get_model_config("kd-tiny-student"))
    cfg["vision_cfg"]["pool_type"] = "avg"
    cfg["vision_cfg"]["final_ln_after_pool"] = True
    model = CLIP(**cfg).eval()
    tower = PromptedVisionTower(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(tower(images), model.encode_image(images)) <= 1e-6
        # Prompts at depth 0 only feed attention; avg pooling must not average them in.
        prompted = tower(images, hook=AppendPrompts([torch.randn(3, tower.width)]))
    assert prompted.shape == (2, tower.output_dim)
    assert _max_diff(prompted, model.encode_image(images)) > 1e-4


def test_prompts_change_output_and_get_gradients(models):
    loaded = models["kd-tiny-teacher"]
    vision = PromptedVisionTower(loaded.model)
    text = PromptedTextTower(loaded.model)
    images = _images(loaded)
    tokens = loaded.tokenizer(["X X X X red circle.", "X X X X blue square."])
    vp = [torch.randn(4, vision.width, requires_grad=True) for _ in range(3)]
    tp = [torch.randn(4, text.width, requires_grad=True) for _ in range(2)]
    img = vision(images, hook=AppendPrompts(vp))
    txt = text(tokens, hook=ReplacePrompts(tp))
    with torch.no_grad():
        assert _max_diff(img, loaded.model.encode_image(images)) > 1e-4
        assert _max_diff(txt, loaded.model.encode_text(tokens)) > 1e-4
    (img.sum() + txt.sum()).backward()
    for p in vp + tp:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # Batched prompts (B, n, W) work too, and the prompt count stays fixed across depths.
    batched = torch.randn(2, 4, vision.width)
    assert vision(images, hook=AppendPrompts([batched, None, batched])).shape == img.shape


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainable_blocks_run_a_faster_attention_with_equal_outputs_and_gradients(
    models, monkeypatch, checkpointing
):
    """With gradients, plain blocks take towers._block_forward (contiguous in-projection): the same
    features and the same prompt gradients as open_clip's own block, vision and (causal) text alike."""
    from kdprompt.models import towers

    loaded = models["ViT-B-32"]
    vision, text = PromptedVisionTower(loaded.model), PromptedTextTower(loaded.model)
    assert all(towers._plain_block(b, None) for b in loaded.model.visual.transformer.resblocks)
    mask = torch.full((4, 4), float("-inf")).triu_(1)
    assert towers._plain_block(loaded.model.transformer.resblocks[0], mask)
    assert not towers._plain_block(loaded.model.transformer.resblocks[0], mask < 0)  # bool: open_clip's path
    images, tokens = _images(loaded), loaded.tokenizer(["X X a photo of a cat.", "X X a dog."])
    loaded.model.visual.transformer.grad_checkpointing = checkpointing
    used = []
    fast = towers._block_forward
    monkeypatch.setattr(towers, "_block_forward", lambda *a: used.append(1) or fast(*a))

    def run():
        vp = [torch.randn(2, vision.width, generator=torch.Generator().manual_seed(d)) for d in range(3)]
        tp = [torch.randn(2, text.width, generator=torch.Generator().manual_seed(9 + d)) for d in range(2)]
        for p in vp + tp:
            p.requires_grad_(True)
        img, txt = vision(images, hook=AppendPrompts(vp)), text(tokens, hook=ReplacePrompts(tp))
        (img.square().sum() + txt.square().sum()).backward()
        return img.detach(), txt.detach(), [p.grad for p in vp + tp]

    try:
        img, txt, grads = run()
        blocks = len(vision.visual.transformer.resblocks)
        # Checkpointed vision blocks run their forward again in the backward.
        assert len(used) == blocks * (2 if checkpointing else 1) + len(loaded.model.transformer.resblocks)
        monkeypatch.setattr(towers, "_plain_block", lambda *a: False)
        ref_img, ref_txt, ref_grads = run()
    finally:
        loaded.model.visual.transformer.grad_checkpointing = False
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_context_prompts_reproduce_the_template(models):
    """Prompts equal to the embeddings of "a photo of a" reproduce encode_text (PromptSRC's init)."""
    loaded = models["kd-tiny-teacher"]
    model = loaded.model
    text = PromptedTextTower(model)
    reference = loaded.tokenizer(["a photo of a red circle."])
    placeholder = loaded.tokenizer(["X X X X red circle."])
    with torch.no_grad():
        ctx = model.token_embedding(reference)[0, 1:5]
        prompted = text(placeholder, hook=ReplacePrompts([ctx], start=1))
        assert _max_diff(prompted, model.encode_text(reference)) <= 1e-6
        assert _max_diff(text(placeholder), model.encode_text(reference)) > 1e-4


def test_prompt_validation(models):
    loaded = models["kd-tiny-student"]
    vision = PromptedVisionTower(loaded.model)
    images = _images(loaded)
    too_deep = [torch.zeros(2, vision.width)] * (vision.num_layers + 1)
    with pytest.raises(KdpromptError, match="depth 4"):
        vision(images, hook=AppendPrompts(too_deep))
    with pytest.raises(KdpromptError, match="width"):
        vision(images, hook=AppendPrompts([torch.zeros(2, vision.width + 1)]))
    with pytest.raises(ValueError, match="same number"):
        AppendPrompts([torch.zeros(2, 64), torch.zeros(3, 64)])
    with pytest.raises(ValueError, match="depth 0"):
        AppendPrompts([None, torch.zeros(2, 64)])


def test_non_vit_tower_is_refused():
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": (1, 1, 1, 1), "width": 8},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    )
    with pytest.raises(KdpromptError, match=r"ModifiedResNet.*adaptation: full"):
        PromptedVisionTower(model, "tiny-resnet")
    # The text tower of that model is the standard one and stays usable.
    assert PromptedTextTower(model).num_layers == 1


def test_unknown_model_lists_kdprompt_configs():
    with pytest.raises(KdpromptError) as err:
        create_clip(ModelSpec(name="no-such-model"))
    message = str(err.value)
    assert "kd-tiny-teacher" in message and "kd-tiny-student" in message
    assert "open_clip.list_models()" in message


def test_json_config_path(tmp_path):
    cfg = open_clip.get_model_config("kd-tiny-student")
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps(cfg))
    assert resolve_model_name(str(path)) == "my-tiny"
    assert create_clip(ModelSpec(name=str(path))).name == "my-tiny"
    with pytest.raises(KdpromptError, match="does not exist"):
        resolve_model_name(str(tmp_path / "absent.json"))


def test_json_config_may_not_shadow_another_config(tmp_path):
    path = tmp_path / "ViT-B-32.json"
    path.write_text(json.dumps(open_clip.get_model_config("kd-tiny-student")))
    with pytest.raises(KdpromptError, match="rename the file"):
        resolve_model_name(str(path))
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512


def test_custom_text_clip_text_tower_matches():
    torch.manual_seed(0)
    cfg = copy.deepcopy(open_clip.get_model_config("kd-tiny-student"))
    model = CustomTextCLIP(**cfg).eval()
    tower = PromptedTextTower(model)
    tokens = open_clip.get_tokenizer("kd-tiny-student")(["a photo of a red circle."])
    with torch.no_grad():
        assert _max_diff(tower(tokens), model.encode_text(tokens)) <= 1e-6
        prompted = tower(tokens, hook=ReplacePrompts([None, torch.randn(2, tower.width)]))
    assert _max_diff(prompted, model.encode_text(tokens)) > 1e-4


def test_save_and_reload_weights(models, tmp_path):
    loaded = models["kd-tiny-teacher"]
    path = save_clip_weights(loaded.model, tmp_path / "w.safetensors")
    images = _images(loaded)
    tokens = loaded.tokenizer(["a red circle"])
    # open_clip's own loader reads the file ...
    theirs, _, _ = open_clip.create_model_and_transforms("kd-tiny-teacher", pretrained=str(path))
    # ... and so does create_clip.
    ours = create_clip(ModelSpec(name="kd-tiny-teacher", pretrained=str(path))).model
    with torch.no_grad():
        want_img, want_txt = loaded.model.encode_image(images), loaded.model.encode_text(tokens)
        for model in (theirs.eval(), ours):
            assert torch.equal(model.encode_image(images), want_img)
            assert torch.equal(model.encode_text(tokens), want_txt)
    # A .pt state dict wrapped in {"state_dict": ...} with DDP's "module." prefix loads too.
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in loaded.model.state_dict().items()}}, pt)
    again = create_clip(ModelSpec(name="kd-tiny-teacher", pretrained=str(pt))).model
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), want_img)


def test_mismatched_weights_name_keys(models, tmp_path):
    path = save_clip_weights(models["kd-tiny-student"].model, tmp_path / "student.safetensors")
    with pytest.raises(KdpromptError, match=r"does not match model 'kd-tiny-teacher'.*another shape"):
        create_clip(ModelSpec(name="kd-tiny-teacher", pretrained=str(path)))
    partial = tmp_path / "partial.pt"
    state = dict(models["kd-tiny-teacher"].model.state_dict())
    state.pop("logit_scale")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, partial)
    with pytest.raises(
        KdpromptError, match=r"missing keys \(e.g. logit_scale\).*unexpected keys \(e.g. extra.weight\)"
    ):
        create_clip(ModelSpec(name="kd-tiny-teacher", pretrained=str(partial)))


def test_missing_weights_file_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "teacher.safetensors"
    with pytest.raises(KdpromptError, match=str(missing)):
        create_clip(ModelSpec(name="kd-tiny-teacher", pretrained=str(missing)))


def test_unknown_tag_names_model_tags_and_fix():
    with pytest.raises(KdpromptError) as err:
        create_clip(ModelSpec(name="ViT-B-32", pretrained="no-such-tag"))
    message = str(err.value)
    assert "ViT-B-32" in message and "no-such-tag" in message and "openai" in message
    assert "local weights file" in message


def test_tag_without_network_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    # Stand in for the download so the test never touches the network.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(KdpromptError, match=r"'openai' for model 'ViT-B-32'.*no network.*local weights file"):
        create_clip(ModelSpec(name="ViT-B-32", pretrained="openai"))


def test_precision_casts(models):
    loaded = create_clip(ModelSpec(name="kd-tiny-student", precision="bf16"))
    assert loaded.model.visual.proj.dtype == torch.bfloat16
    vision = PromptedVisionTower(loaded.model)
    with torch.no_grad():
        out = vision(_images(loaded), hook=AppendPrompts([torch.zeros(2, vision.width)]))
    assert out.dtype == torch.bfloat16


def test_student_image_tower_is_small(models):
    def count(name: str) -> int:
        return sum(p.numel() for p in models[name].model.visual.parameters())

    assert count("kd-tiny-student") * 3 <= count("kd-tiny-teacher")


def test_spec_is_strict():
    with pytest.raises(ValueError):
        ModelSpec(name="kd-tiny-teacher", weights="x")
    with pytest.raises(ValueError):
        ModelSpec(name="kd-tiny-teacher", precision="fp8")


def test_local_weights_say_what_was_loaded_not_random_init(tmp_path, caplog, capsys):
    import logging

    from kdprompt.io import file_sha256
    from kdprompt.models import ModelSpec, create_clip, save_clip_weights

    path = tmp_path / "w.safetensors"
    save_clip_weights(create_clip(ModelSpec(name="kd-tiny-student")).model, path)
    capsys.readouterr()
    caplog.clear()  # building the random weights above rightly warned
    with caplog.at_level(logging.WARNING):
        create_clip(ModelSpec(name="kd-tiny-student", pretrained=str(path)))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"loaded kd-tiny-student weights from {path} (sha256 {file_sha256(path)[:12]})"
    ]
