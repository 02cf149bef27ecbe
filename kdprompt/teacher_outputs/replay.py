"""Replaying stored views while distilling: which view an epoch uses, and the transform that re-creates it."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from kdprompt.errors import KdpromptError

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from kdprompt.data.augment import ReplayableView
    from kdprompt.teacher_outputs.reader import TeacherOutputs


def view_index(seed: int, epoch: int, key: str, views: int) -> int:
    """The stored view (0 .. views-1) sample ``key`` trains on in ``epoch`` of a run seeded ``seed``."""
    return random.Random(f"teacher-view:{seed}:{epoch}:{key}").randrange(views)


def stored_features(
    outputs: TeacherOutputs, seed: int, epoch: int, urls: list[str], keys: list[str]
) -> Tensor:
    """The stored teacher features (B, D, storage dtype) of the views ``epoch`` picks for samples ``keys``.

    The rows :class:`ReplayTransform` re-created the images of: a run seeded ``seed`` reads these in ``epoch``.
    """
    views = [view_index(seed, epoch, key, outputs.views) for key in keys]
    return outputs.features(urls, keys, views)


class ReplayTransform:
    """The training transform of a distill run on stored teacher outputs.

    A keyed transform (``keyed = True``: the shard stream passes each sample's key, shard URL and the
    epoch): it picks the epoch's view with :func:`view_index` and re-creates it from the stored crop box
    and flip, so the student sees exactly the view whose teacher features the step reads.
    """

    keyed = True

    def __init__(self, outputs: TeacherOutputs, view: ReplayableView, seed: int) -> None:
        self.outputs = outputs
        self.view = view
        self.seed = seed

    def __call__(self, img: Image.Image, *, key: str, url: str, epoch: int) -> Tensor:
        params, size = self.outputs.view(url, key, view_index(self.seed, epoch, key, self.outputs.views))
        if img.size != size:
            raise KdpromptError(
                f"image {key} of shard {url} is {img.size[0]}x{img.size[1]} but its teacher outputs were "
                f"made from a {size[0]}x{size[1]} image; rerun `kdprompt teacher-outputs RECIPE`"
            )
        return self.view.apply(img, params)
