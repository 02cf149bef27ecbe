"""The CoOp evaluation protocol: K-shot sampling per class, and the base/novel class split.

Few-shot: K images per class drawn with a seeded RNG (all of them when a class has fewer); the val
split uses ``min(K, 4)`` shots. Base-to-novel: base = the first ``ceil(n / 2)`` labels, novel = the
rest, each relabelled from 0.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Literal

from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError

ClassSubset = Literal["all", "base", "novel"]
CLASS_SUBSETS: tuple[str, ...] = ("all", "base", "novel")
MAX_VAL_SHOTS = 4


def few_shot(samples: list[Sample], shots: int | None, seed: int) -> list[Sample]:
    """Draw ``shots`` samples per label, CoOp's way.

    Args:
        samples: the full split.
        shots: samples per class; ``None`` or ``<= 0`` keeps every sample.
        seed: seeds a private ``random.Random``, so equal seeds give equal subsets.

    Returns:
        The drawn samples sorted by (label, position in ``samples``); a class with fewer than
        ``shots`` samples contributes all of them.
    """
    if shots is None or shots <= 0:
        return list(samples)
    by_label: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_label):
        idx = by_label[label]
        # CoOp samples when a class has >= K items (so a class of exactly K still advances the RNG).
        keep.extend(sorted(rng.sample(idx, shots)) if len(idx) >= shots else idx)
    return [samples[i] for i in keep]


def val_shots(shots: int | None) -> int:
    """Shots per class for the val split: ``min(shots, 4)``; 0 (= all) when ``shots`` means all."""
    if shots is None or shots <= 0:
        return 0
    return min(shots, MAX_VAL_SHOTS)


def base_novel_labels(num_classes: int) -> tuple[list[int], list[int]]:
    """``(base, novel)`` labels: base = the first ``ceil(n / 2)`` of ``0..n-1``, novel = the rest."""
    if num_classes < 0:
        raise KdpromptError(f"num_classes must be >= 0, got {num_classes}")
    m = (num_classes + 1) // 2
    return list(range(m)), list(range(m, num_classes))


def class_subset_labels(num_classes: int, which: ClassSubset) -> list[int]:
    """The original labels kept by ``which`` ("all", "base" or "novel"), ascending."""
    if which == "all":
        return list(range(num_classes))
    base, novel = base_novel_labels(num_classes)
    if which == "base":
        return base
    if which == "novel":
        return novel
    raise KdpromptError(f"unknown class subset {which!r}; choose one of {', '.join(CLASS_SUBSETS)}")


def subsample_classes(split: Split, which: ClassSubset) -> Split:
    """Keep the ``which`` classes of ``split``, relabelled from 0 in ascending original-label order.

    Base/novel are decided on ``len(split.classnames)``, not on the labels present, so every split of
    a dataset divides the same way. ``meta`` gains ``classes`` (= ``which``) and ``original_labels``
    (``original_labels[new_label] = old_label``).
    """
    n = len(split.classnames)
    kept = class_subset_labels(n, which)
    new_of = {old: new for new, old in enumerate(kept)}
    samples = []
    for s in split.samples:
        if not 0 <= s.label < n:
            what = s.key or (s.image if isinstance(s.image, str) else "<bytes>")
            raise KdpromptError(f"sample {what!r} has label {s.label}, outside 0..{n - 1}")
        if s.label in new_of:
            samples.append(replace(s, label=new_of[s.label]))
    meta = {**split.meta, "classes": which, "original_labels": kept}
    return Split(samples=samples, classnames=[split.classnames[i] for i in kept], name=split.name, meta=meta)


__all__ = [
    "CLASS_SUBSETS",
    "MAX_VAL_SHOTS",
    "ClassSubset",
    "base_novel_labels",
    "class_subset_labels",
    "few_shot",
    "subsample_classes",
    "val_shots",
]
