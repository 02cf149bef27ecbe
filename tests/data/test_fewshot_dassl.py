"""Few-shot draws equal Dassl's, image for image, on split files in CoOp's real JSON format.

The reference below is written from Dassl.pytorch ``dassl/data/datasets/base_dataset.py``
(``generate_fewshot_dataset``, ``split_dataset_by_label``), CoOp ``datasets/oxford_pets.py``
(``read_split``, the few-shot calls, ``subsample_classes``) and CoOp ``train.py`` /
Dassl ``dassl/utils/tools.py`` (``set_random_seed`` seeds Python's global ``random``). It uses the
global RNG the way the reference does and never calls kdprompt's protocol code.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest

from kdprompt.config.teacher import TeacherRecipe
from kdprompt.data.coop import CoopData, coop_paths, load_coop_split
from kdprompt.data.protocol import fewshot_protocol
from kdprompt.train.teacher_loop import fewshot_splits

# ---------------------------------------------------------------- the reference, re-implemented


class Datum(NamedTuple):
    impath: str
    label: int
    classname: str


def ref_read_split(split_file: Path, image_dir: Path) -> tuple[list[Datum], list[Datum], list[Datum]]:
    rows = json.loads(split_file.read_text())

    def convert(entries: list) -> list[Datum]:
        return [Datum(os.path.join(image_dir, path), int(label), name) for path, label, name in entries]

    return convert(rows["train"]), convert(rows["val"]), convert(rows["test"])


def ref_generate_fewshot(data: list[Datum], num_shots: int) -> list[Datum]:
    if num_shots < 1:
        return data
    groups: defaultdict[int, list[Datum]] = defaultdict(list)
    for datum in data:
        groups[datum.label].append(datum)
    out: list[Datum] = []
    for items in groups.values():  # insertion order: labels as they first appear
        if len(items) >= num_shots:
            out.extend(random.sample(items, num_shots))
        else:  # repeat=True, the default the dataset classes keep
            out.extend(random.choices(items, k=num_shots))
    return out


def ref_subsample(*datasets: list[Datum], subsample: str) -> list[list[Datum]]:
    if subsample == "all":
        return list(datasets)
    labels = sorted({d.label for d in datasets[0]})
    half = math.ceil(len(labels) / 2)
    kept = labels[:half] if subsample == "base" else labels[half:]
    new = {old: i for i, old in enumerate(kept)}
    return [[Datum(d.impath, new[d.label], d.classname) for d in ds if d.label in new] for ds in datasets]


def reference_draw(
    split_file: Path, image_dir: Path, shots: int, seed: int, subsample: str
) -> tuple[list[Datum], list[Datum]]:
    saved = random.getstate()
    try:
        random.seed(seed)  # set_random_seed(cfg.SEED), before the dataset is built
        train, val, test = ref_read_split(split_file, image_dir)
        train = ref_generate_fewshot(train, shots)
        val = ref_generate_fewshot(val, min(shots, 4))
        train, val, _ = ref_subsample(train, val, test, subsample=subsample)
    finally:
        random.setstate(saved)
    return train, val


# ---------------------------------------------------------------- split files in the real format

N_CLASSES = 13


def write_split_file(root: Path, dataset: str, seed: int = 0) -> tuple[Path, Path]:
    """A CoOp split file whose entries interleave labels, as StanfordCars' and Flowers' do.

    Train classes hold 3..40 images (so 16 shots hit the with-replacement path), val 1..7.
    """
    rng = random.Random(seed)
    _, image_dir, split_file = coop_paths(root, dataset)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in range(N_CLASSES):
        name = f"class_{label:03d}"
        counts = {"train": rng.randint(3, 40), "val": rng.randint(1, 7), "test": 2}
        for split, n in counts.items():
            rows[split] += [[f"{split}/{name}_{i:04d}.jpg", label, name] for i in range(n)]
    for entries in rows.values():
        rng.shuffle(entries)
    # The file's first entry has a high label: first appearance differs from label order.
    assert rows["train"][0][1] != 0
    split_file.write_text(json.dumps(rows, indent=1))
    return split_file, image_dir


def as_tuples(samples) -> list[tuple[str, int, str]]:
    return [(s.image, s.label, s.classname) for s in samples]


@pytest.fixture(scope="module", params=["stanford_cars", "oxford_flowers"])
def split_root(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    split_file, image_dir = write_split_file(root, request.param)
    return root, request.param, split_file, image_dir


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("subsample", ["all", "base"])
def test_draw_equals_dassl(split_root, shots, subsample):
    root, dataset, split_file, image_dir = split_root
    cfg = CoopData(root=root, dataset=dataset)
    train, val = load_coop_split(cfg, "train"), load_coop_split(cfg, "val")
    seen = set()
    for seed in (1, 2, 3, 17):
        ref_train, ref_val = reference_draw(split_file, image_dir, shots, seed, subsample)
        got_train, got_val = fewshot_protocol(train, val, shots, subsample, seed)
        assert as_tuples(got_train.samples) == [tuple(d) for d in ref_train]
        assert as_tuples(got_val.samples) == [tuple(d) for d in ref_val]
        seen.add(tuple(d.impath for d in ref_train))
    assert len(seen) > 1  # the seeds do pick different images


def test_teacher_stage_draws_what_dassl_draws(split_root):
    root, dataset, split_file, image_dir = split_root
    recipe = TeacherRecipe.model_validate(
        {
            "name": "t",
            "model": {"name": "kd-tiny-teacher"},
            "data": {"source": "coop", "root": str(root), "dataset": dataset},
            "fewshot": {"shots": 16, "classes": "base"},
            "seed": 2,
            "selection": "val",
        }
    )
    train, val, all_classnames = fewshot_splits(recipe)
    ref_train, ref_val = reference_draw(split_file, image_dir, 16, 2, "base")
    assert as_tuples(train.samples) == [tuple(d) for d in ref_train]
    assert val is not None and as_tuples(val.samples) == [tuple(d) for d in ref_val]
    assert len(all_classnames) == N_CLASSES and len(train.classnames) == math.ceil(N_CLASSES / 2)
    # Without selection: val the train draw is the same (val is drawn after it).
    last = TeacherRecipe.model_validate({**recipe.model_dump(), "selection": "last"})
    assert as_tuples(fewshot_splits(last)[0].samples) == as_tuples(train.samples)
