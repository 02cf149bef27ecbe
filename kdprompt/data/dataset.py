"""Map-style torch datasets over labelled splits (few-shot training and evaluation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from kdprompt.data.types import Split, load_image


class SplitDataset(Dataset):
    """``(image_tensor, label)`` pairs of a :class:`Split`; a corrupt image raises an error naming it."""

    def __init__(self, split: Split, transform: Callable) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.split.samples[index]
        return self.transform(load_image(sample)), sample.label
