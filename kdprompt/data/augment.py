"""Training augmentation: the ``augmentation:`` recipe section and the train transform it builds.

Two presets:

- ``open_clip``: open_clip's own ``preprocess_train`` (random resized crop, scale 0.9-1, bicubic, no
  flip); the default, so nothing changes for recipes that do not ask.
- ``dassl``: what the CoOp-family references train teacher and student with (PromptSRC, MaPLe, PromptKD
  ``configs/trainers/*/*.yaml``: ``INPUT.TRANSFORMS: [random_resized_crop, random_flip, normalize]``,
  ``INTERPOLATION: bicubic``), built by Dassl's ``dassl/data/transforms/transforms.py``
  (``_build_transform_train``: ``RandomResizedCrop(size, scale=INPUT.RRCROP_SCALE)`` with torchvision's
  default aspect ratios, then ``RandomHorizontalFlip()`` at p = 0.5); ``RRCROP_SCALE`` defaults to
  (0.08, 1.0) in ``dassl/config/defaults.py`` and none of those configs changes it.

Size, mean and std always come from the model's open_clip preprocessing config, as the reference
configs set CLIP's normalisation and 224 px.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from kdprompt.config.base import StrictModel

if TYPE_CHECKING:  # recipes import this module: keep torchvision out of their import time
    from torchvision.transforms import Compose

Interpolation = Literal["bicubic", "bilinear"]

# scale, ratio, flip, interpolation of each preset. torchvision's RandomResizedCrop default ratio
# (3/4, 4/3) is what both open_clip and Dassl use (neither passes one).
PRESETS: dict[str, dict[str, Any]] = {
    "open_clip": {"scale": (0.9, 1.0), "ratio": (3 / 4, 4 / 3), "flip": False, "interpolation": "bicubic"},
    "dassl": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "flip": True, "interpolation": "bicubic"},
}


class AugmentationConfig(StrictModel):
    """Random-resized-crop (+ optional horizontal flip) augmentation of training images.

    A field left unset (null) takes the preset's value; a set one overrides it.
    """

    preset: Literal["open_clip", "dassl"] = Field(
        default="open_clip",
        description="open_clip: crop scale 0.9-1, no flip (open_clip's preprocess_train); "
        "dassl: crop scale 0.08-1 + flip (the CoOp/PromptSRC/MaPLe/PromptKD references)",
    )
    scale: tuple[float, float] | None = Field(
        default=None, description="random-resized-crop area range, fraction of the image (null: preset's)"
    )
    ratio: tuple[float, float] | None = Field(
        default=None, description="random-resized-crop aspect-ratio range (null: preset's, 3/4-4/3)"
    )
    flip: bool | None = Field(default=None, description="random horizontal flip, p = 0.5 (null: preset's)")
    interpolation: Interpolation | None = Field(
        default=None, description="resampling of the crop (null: preset's, bicubic)"
    )

    @model_validator(mode="after")
    def _ranges(self) -> AugmentationConfig:
        if self.scale is not None and not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {list(self.scale)}")
        if self.ratio is not None and not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {list(self.ratio)}")
        return self

    def resolved(self) -> dict[str, Any]:
        """``scale``, ``ratio``, ``flip`` and ``interpolation``: the preset's, overridden by set fields."""
        values = dict(PRESETS[self.preset])
        for key in values:
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return values


def train_transform(cfg: AugmentationConfig, preprocess: Mapping[str, Any]) -> Compose:
    """The training transform ``cfg`` describes, for a model with open_clip preprocessing ``preprocess``.

    The steps (and so the random draws) are open_clip's ``image_transform(is_train=True)`` ones with the
    flip inserted after the crop as Dassl does: with the ``open_clip`` preset the result is the same
    transform as the model's ``preprocess_train``.

    Args:
        cfg: the recipe's ``augmentation`` section.
        preprocess: the model's ``visual.preprocess_cfg`` (``size``, ``mean``, ``std``).

    Returns:
        PIL image -> normalised (3, H, W) tensor.
    """
    from open_clip.transform import MaybeConvertMode, MaybeToTensor
    from torchvision import transforms as T

    aug = cfg.resolved()
    mode = T.InterpolationMode.BICUBIC if aug["interpolation"] == "bicubic" else T.InterpolationMode.BILINEAR
    steps: list[Any] = [
        T.RandomResizedCrop(
            preprocess["size"], scale=tuple(aug["scale"]), ratio=tuple(aug["ratio"]), interpolation=mode
        ),
        MaybeConvertMode(),
    ]
    if aug["flip"]:
        steps.append(T.RandomHorizontalFlip())
    steps += [MaybeToTensor(), T.Normalize(mean=preprocess["mean"], std=preprocess["std"])]
    return T.Compose(steps)
