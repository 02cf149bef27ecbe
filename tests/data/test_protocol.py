"""The CoOp protocol: few-shot sampling and the base/novel split (kdprompt.data.protocol)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kdprompt.data.protocol import (
    base_novel_labels,
    class_subset_labels,
    few_shot,
    subsample_classes,
    val_shots,
)
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError

# Total classes -> (base, novel) as published for the 11 CoOp base-to-novel datasets.
PUBLISHED_BASE_NOVEL = {
    "imagenet": (1000, 500, 500),
    "caltech101": (100, 50, 50),
    "oxford_pets": (37, 19, 18),
    "stanford_cars": (196, 98, 98),
    "oxford_flowers": (102, 51, 51),
    "food101": (101, 51, 50),
    "fgvc_aircraft": (100, 50, 50),
    "sun397": (397, 199, 198),
    "dtd": (47, 24, 23),
    "eurosat": (10, 5, 5),
    "ucf101": (101, 51, 50),
}


def make_split(counts: list[int], shuffle_seed: int | None = 0) -> Split:
    """``counts[label]`` samples per label, interleaved (not grouped) like a real split file."""
    names = [f"class {i}" for i in range(len(counts))]
    samples = [
        Sample(f"/img/{lab}_{j}.jpg", lab, names[lab], key=f"{lab}_{j}")
        for lab, n in enumerate(counts)
        for j in range(n)
    ]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    return Split(samples=samples, classnames=names, name="train", meta={"source": "test"})


@pytest.mark.parametrize("dataset", sorted(PUBLISHED_BASE_NOVEL))
def test_published_base_novel_counts(dataset):
    n, n_base, n_novel = PUBLISHED_BASE_NOVEL[dataset]
    base, novel = base_novel_labels(n)
    assert (len(base), len(novel)) == (n_base, n_novel)
    assert base + novel == list(range(n))


def test_base_novel_small():
    assert base_novel_labels(7) == ([0, 1, 2, 3], [4, 5, 6])
    assert base_novel_labels(1) == ([0], [])
    assert base_novel_labels(0) == ([], [])
    assert class_subset_labels(5, "all") == [0, 1, 2, 3, 4]
    with pytest.raises(KdpromptError, match="all, base, novel"):
        class_subset_labels(5, "some")  # type: ignore[arg-type]


def test_few_shot_counts_and_determinism():
    counts = [5, 4, 3, 2, 1, 0, 6]
    samples = make_split(counts).samples
    first_seen = list(dict.fromkeys(s.label for s in samples))
    draws = []
    for seed in (1, 2, 3):
        picked = few_shot(samples, 2, seed)
        # Dassl's repeat=True: a class with fewer than K draws K with replacement.
        assert Counter(s.label for s in picked) == {i: 2 for i, n in enumerate(counts) if n}
        assert picked == few_shot(samples, 2, seed)
        # Classes in order of first appearance in the split (Dassl's defaultdict), not sorted.
        assert list(dict.fromkeys(s.label for s in picked)) == first_seen
        draws.append([s.key for s in picked])
    assert draws[0] != draws[1] or draws[1] != draws[2]
    # A class with fewer than K repeats what it has; repeat=False takes it whole instead.
    assert [s.key for s in few_shot(samples, 2, 1) if s.label == 4] == ["4_0", "4_0"]
    assert [s.key for s in few_shot(samples, 2, 1, repeat=False) if s.label == 4] == ["4_0"]
    many = few_shot(samples, 16, 1)
    assert len(many) == 16 * 6 and {s.key for s in many} <= {s.key for s in samples}
    assert sorted(s.key for s in few_shot(samples, 16, 1, repeat=False)) == sorted(s.key for s in samples)


def test_few_shot_all():
    samples = make_split([3, 2]).samples
    for shots in (None, 0, -1):
        out = few_shot(samples, shots, 1)
        assert out == samples and out is not samples


def test_val_shots():
    assert [val_shots(k) for k in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]
    assert val_shots(None) == 0 and val_shots(-1) == 0


def test_subsample_relabels():
    split = make_split([2, 1, 3, 1, 2, 2, 1], shuffle_seed=None)
    novel = subsample_classes(split, "novel")
    assert novel.classnames == ["class 4", "class 5", "class 6"]
    assert novel.meta == {"source": "test", "classes": "novel", "original_labels": [4, 5, 6]}
    assert [(s.label, s.classname, s.key) for s in novel.samples] == [
        (0, "class 4", "4_0"),
        (0, "class 4", "4_1"),
        (1, "class 5", "5_0"),
        (1, "class 5", "5_1"),
        (2, "class 6", "6_0"),
    ]
    base = subsample_classes(split, "base")
    assert base.meta["original_labels"] == [0, 1, 2, 3] and len(base) == 7
    assert all(s.classname == base.classnames[s.label] for s in base.samples)
    everything = subsample_classes(split, "all")
    assert everything.samples == split.samples and everything.meta["classes"] == "all"
    assert split.meta == {"source": "test"}  # the input is not modified


def test_subsample_rejects_bad_label():
    bad = Split([Sample("/x.jpg", 3, "oops", key="x.jpg")], ["a", "b"])
    with pytest.raises(KdpromptError, match=r"x\.jpg"):
        subsample_classes(bad, "base")
