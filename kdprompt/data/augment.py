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

:class:`ReplayableView` is the same transform with its random draws made explicit: a
:class:`ViewParams` (crop box and flip) sampled from a seed string, and applied to an image. The teacher
output cache (:mod:`kdprompt.teacher_outputs`) stores those parameters beside the teacher's features and
re-creates exactly that view when the student trains.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from kdprompt.config.base import StrictModel

if TYPE_CHECKING:  # recipes import this module: keep torchvision out of their import time
    from PIL import Image
    from torch import Tensor
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


# Bumped whenever ViewParams sampling changes: a cache of views drawn by another sampler is refused.
VIEW_SAMPLER_VERSION = 1


@dataclass(frozen=True)
class ViewParams:
    """One augmented view: the crop box (pixels of the source image) and whether it is flipped."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_row(self) -> list[int]:
        """``[top, left, height, width, flip]`` as ints (how the teacher output cache stores it)."""
        return [int(v) for v in astuple(self)]

    @classmethod
    def from_row(cls, row: Any) -> ViewParams:
        """The inverse of :meth:`as_row`."""
        top, left, height, width, flip = (int(v) for v in row)
        return cls(top, left, height, width, bool(flip))


class ReplayableView:
    """:func:`train_transform` with explicit draws: sample a view from a seed, or apply a given one.

    ``apply(img, sample(w, h, rng))`` runs the same steps as ``train_transform`` (random-resized crop,
    RGB conversion, optional flip, to-tensor, normalise); :meth:`sample` draws the crop as torchvision's
    ``RandomResizedCrop.get_params`` does, but from a ``random.Random`` instead of torch's global RNG.

    Args:
        cfg: the recipe's ``augmentation`` section.
        preprocess: the model's ``visual.preprocess_cfg`` (``size``, ``mean``, ``std``).
    """

    def __init__(self, cfg: AugmentationConfig, preprocess: Mapping[str, Any]) -> None:
        from torchvision import transforms as T

        self.aug = cfg.resolved()
        steps = train_transform(cfg, preprocess).transforms
        self.crop: T.RandomResizedCrop = steps[0]
        self.finish = T.Compose([t for t in steps[1:] if not isinstance(t, T.RandomHorizontalFlip)])
        normalize = steps[-1]
        self.identity = {
            "sampler_version": VIEW_SAMPLER_VERSION,
            "scale": list(self.aug["scale"]),
            "ratio": list(self.aug["ratio"]),
            "flip": bool(self.aug["flip"]),
            "interpolation": self.aug["interpolation"],
            "size": list(self.crop.size),
            "mean": [float(v) for v in normalize.mean],
            "std": [float(v) for v in normalize.std],
        }

    def sample(self, width: int, height: int, rng: random.Random) -> ViewParams:
        """Draw a view of a ``width`` x ``height`` image (torchvision's crop algorithm, then a coin flip)."""
        scale, ratio = self.aug["scale"], self.aug["ratio"]
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        box = None
        for _ in range(10):
            target_area = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                box = (rng.randint(0, height - h), rng.randint(0, width - w), h, w)
                break
        if box is None:  # torchvision's fallback: the central crop within the ratio range
            in_ratio = width / height
            if in_ratio < min(ratio):
                w, h = width, round(width / min(ratio))
            elif in_ratio > max(ratio):
                w, h = round(height * max(ratio)), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        flip = bool(self.aug["flip"]) and rng.random() < 0.5
        return ViewParams(*box, flip=flip)

    def apply(self, img: Image.Image, params: ViewParams) -> Tensor:
        """The normalised (3, H, W) tensor of view ``params`` of ``img``."""
        from torchvision.transforms import functional as F

        crop = self.crop
        out = F.resized_crop(
            img,
            params.top,
            params.left,
            params.height,
            params.width,
            list(crop.size),
            crop.interpolation,
            antialias=crop.antialias,
        )
        if params.flip:
            out = F.hflip(out)
        # Flipping before the RGB conversion gives the same pixels as after it (train_transform's order).
        return self.finish(out)


def view_converter(src: Any, dst: Any) -> Callable[[Tensor], Tensor]:
    """A function mapping a batch preprocessed for ``src`` to the preprocessing of ``dst``.

    Both models see the same augmented image: the student's view is un-normalised, resized when the
    image sizes differ, and normalised with the teacher's mean/std.

    Args:
        src: the transform the batch went through (a torchvision ``Compose``; its ``Normalize`` and size).
        dst: the transform whose normalisation and size the result takes.
    """
    import torch
    import torch.nn.functional as F

    def norm(tf: Any) -> tuple[Tensor, Tensor, int]:
        steps = getattr(tf, "transforms", [])
        n = next((t for t in steps if t.__class__.__name__ == "Normalize"), None)
        size = next((getattr(t, "size", None) for t in steps if hasattr(t, "size")), None)
        size = size if isinstance(size, int) else (size[0] if size else 0)
        mean = torch.tensor(n.mean if n else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(n.std if n else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        return mean, std, size

    ms, ss, size_s = norm(src)
    mt, st, size_t = norm(dst)

    def convert(x: Tensor) -> Tensor:
        raw = x * ss.to(x) + ms.to(x)
        if size_t and size_s and size_t != size_s:
            raw = F.interpolate(raw, size=(size_t, size_t), mode="bicubic", align_corners=False)
        return (raw - mt.to(x)) / st.to(x)

    return convert
