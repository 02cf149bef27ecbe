"""Training augmentation (kdprompt.data.augment): the open_clip and Dassl presets and their overrides."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from kdprompt.config.loading import load_recipe
from kdprompt.config.teacher import TeacherRecipe
from kdprompt.data.augment import AugmentationConfig, train_transform
from kdprompt.errors import KdpromptError
from kdprompt.models.loading import create_clip
from kdprompt.models.spec import ModelSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_B_16 = {"size": (224, 224), "mean": CLIP_MEAN, "std": CLIP_STD}


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (50, 70, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _outputs(transform, n: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [transform(_image(i)) for i in range(n)]


def _step(transform: T.Compose, kind: type) -> object:
    return next(t for t in transform.transforms if isinstance(t, kind))


def test_open_clip_preset_is_open_clips_preprocess_train():
    clip = create_clip(ModelSpec(name="kd-tiny-teacher"))
    ours = train_transform(AugmentationConfig(), clip.model.visual.preprocess_cfg)
    assert repr(ours) == repr(clip.preprocess_train)
    for a, b in zip(_outputs(ours), _outputs(clip.preprocess_train), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dassl_preset_has_dassls_parameters():
    # Dassl dassl/config/defaults.py: INPUT.RRCROP_SCALE (0.08, 1.0); the reference configs
    # (e.g. PromptKD configs/trainers/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml) set bicubic and
    # random_resized_crop + random_flip + normalize with CLIP's mean/std.
    tf = train_transform(AugmentationConfig(preset="dassl"), VIT_B_16)
    crop = _step(tf, T.RandomResizedCrop)
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert _step(tf, T.RandomHorizontalFlip).p == 0.5
    norm = _step(tf, T.Normalize)
    assert tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD
    # Same draws and result as Dassl's train pipeline re-built with torchvision
    # (dassl/data/transforms/transforms.py, _build_transform_train).
    dassl = T.Compose(
        [
            T.RandomResizedCrop((224, 224), scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    for a, b in zip(_outputs(tf), _outputs(dassl), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fields_override_the_preset():
    cfg = AugmentationConfig(preset="dassl", flip=False, scale=(0.5, 1.0), interpolation="bilinear")
    tf = train_transform(cfg, VIT_B_16)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms)
    crop = _step(tf, T.RandomResizedCrop)
    assert crop.scale == (0.5, 1.0) and crop.interpolation == T.InterpolationMode.BILINEAR
    assert AugmentationConfig(flip=True).resolved()["flip"] is True
    assert AugmentationConfig(flip=True).resolved()["scale"] == (0.9, 1.0)


def test_bad_scale_names_the_field():
    with pytest.raises(KdpromptError, match="augmentation") as err:
        load_recipe(TeacherRecipe, "demo/teacher-promptsrc", ["augmentation.scale=[0.9,0.1]"])
    assert "scale" in str(err.value)
