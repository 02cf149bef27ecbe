"""The CoOp evaluation protocol: K-shot sampling per class, and the base/novel class split.

Few-shot: Dassl's ``DatasetBase.generate_fewshot_dataset`` (Dassl.pytorch
``dassl/data/datasets/base_dataset.py``) reproduced draw for draw, so a seed picks the same images as
CoOp / PromptSRC / PromptKD: labels are visited in order of first appearance in the split, each draws
``random.sample(items, K)`` (``random.choices(items, k=K)``, with repeats, when a class has fewer),
and one RNG seeded with the run's seed serves the train draw and then the val draw (``min(K, 4)``
shots). The reference's dataset classes (e.g. CoOp ``datasets/oxford_pets.py``) draw over all classes
*before* ``subsample_classes`` keeps the base half, which :func:`fewshot_protocol` follows.
Base-to-novel: base = the first ``ceil(n / 2)`` labels, novel = the rest, each relabelled from 0.
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


def few_shot(
    samples: list[Sample], shots: int | None, seed: int | random.Random, *, repeat: bool = True
) -> list[Sample]:
    """Draw ``shots`` samples per label, as Dassl's ``generate_fewshot_dataset`` does.

    Args:
        samples: the full split, in its file order (the order decides which label is visited first).
        shots: samples per class; ``None`` or ``<= 0`` keeps every sample and draws nothing.
        seed: an int seeds a fresh ``random.Random`` (the same stream as Dassl's
            ``random.seed(seed)``); pass a ``random.Random`` to continue a stream (train, then val).
        repeat: a class with fewer than ``shots`` samples draws ``shots`` of them with replacement
            (Dassl's default, which CoOp keeps); ``False`` takes such a class whole.

    Returns:
        The drawn samples in Dassl's order: classes by first appearance, each in draw order.
    """
    if shots is None or shots <= 0:
        return list(samples)
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    by_label: dict[int, list[Sample]] = {}  # a dict keeps first-appearance order, like Dassl's defaultdict
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    for items in by_label.values():
        # random.sample/choices pick by position only, so Samples draw what Dassl's Datums draw.
        if len(items) >= shots:
            out.extend(rng.sample(items, shots))
        elif repeat:
            out.extend(rng.choices(items, k=shots))
        else:
            out.extend(items)
    return out


def few_shot_train_val(
    train: list[Sample], val: list[Sample] | None, shots: int | None, seed: int
) -> tuple[list[Sample], list[Sample] | None]:
    """The train draw, then the val draw (``min(shots, 4)`` shots) from one RNG seeded with ``seed``.

    Dassl's dataset classes seed Python's global ``random`` once (``set_random_seed(cfg.SEED)`` in
    CoOp's ``train.py``) and call ``generate_fewshot_dataset`` on train, then on val: the val draw
    depends on the train draw, never the other way round. ``val=None`` skips it.
    """
    rng = random.Random(seed)
    drawn = few_shot(train, shots, rng)
    return drawn, None if val is None else few_shot(val, val_shots(shots) or None, rng)


def fewshot_protocol(
    train: Split, val: Split | None, shots: int | None, classes: ClassSubset, seed: int
) -> tuple[Split, Split | None]:
    """CoOp's labelled data: the K-shot draw over all classes, then the ``classes`` half of it.

    Returns new splits (``train`` and ``val`` are not modified); ``val`` stays None when None.
    """
    drawn, drawn_val = few_shot_train_val(train.samples, None if val is None else val.samples, shots, seed)
    out = subsample_classes(replace(train, samples=drawn), classes)
    out_val = None if val is None else subsample_classes(replace(val, samples=drawn_val), classes)
    return out, out_val


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
    "few_shot_train_val",
    "fewshot_protocol",
    "subsample_classes",
    "val_shots",
]
