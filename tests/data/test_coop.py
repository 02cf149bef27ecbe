"""The CoOp/Dassl-layout source (kdprompt.data.coop) on tiny fake datasets."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from fixtures_coop import (
    AIRCRAFT_SPLITS,
    AIRCRAFT_VARIANTS,
    DTD_CLASSES,
    DTD_TEST_COUNT,
    DTD_TRAIN_COUNTS,
    DTD_VAL_CLASSES,
    IMAGENET_CLASSES,
    IMAGENET_TRAIN_PER_CLASS,
    IMAGENET_VAL_PER_CLASS,
    make_aircraft,
    make_dtd,
    make_imagenet,
    write_image,
)

from kdprompt.data.coop import COOP_DATASETS, COOP_LAYOUT, CoopData, coop_paths, load_coop_split
from kdprompt.data.protocol import few_shot, subsample_classes
from kdprompt.data.sources import SOURCES
from kdprompt.data.types import load_image
from kdprompt.errors import KdpromptError


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    """One read-only root holding the DTD, ImageNet and FGVC-Aircraft fakes."""
    root = tmp_path_factory.mktemp("coop")
    make_dtd(root)
    make_imagenet(root)
    make_aircraft(root)
    return root


def load(root: Path, dataset: str, split: str):
    return load_coop_split(CoopData(root=root, dataset=dataset), split)


def test_registered_and_table_covers_every_dataset():
    assert SOURCES.get("coop") is CoopData
    assert set(COOP_LAYOUT) == set(COOP_DATASETS)


# --- JSON split datasets (DTD-like) ---------------------------------------------------------------


def test_dtd_splits_share_classes(coop_root):
    splits = {s: load(coop_root, "dtd", s) for s in ("train", "val", "test")}
    assert len(splits["train"]) == sum(DTD_TRAIN_COUNTS)
    assert len(splits["val"]) == DTD_VAL_CLASSES
    assert len(splits["test"]) == DTD_TEST_COUNT * len(DTD_CLASSES)
    for split in splits.values():
        # val lacks the last class, yet indexes the same 7 names.
        assert split.classnames == DTD_CLASSES
        assert split.meta["dataset"] == "dtd"
    train = splits["train"]
    assert Counter(s.label for s in train.samples) == dict(enumerate(DTD_TRAIN_COUNTS))
    first = train.samples[0]
    assert first.classname == "banded" and first.key.startswith("banded/")
    assert Path(first.image) == coop_root / "dtd" / "images" / first.key
    assert load_image(first).size == (8, 8)


def test_dtd_base_novel_relabelled(coop_root):
    test = load(coop_root, "dtd", "test")
    base = subsample_classes(test, "base")
    novel = subsample_classes(test, "novel")
    assert (len(base.classnames), len(novel.classnames)) == (4, 3)
    assert base.classnames == DTD_CLASSES[:4]
    assert novel.meta["original_labels"] == [4, 5, 6] and novel.meta["classes"] == "novel"
    zero = [s for s in novel.samples if s.label == 0]
    assert zero and all(s.classname == DTD_CLASSES[4] == novel.classnames[0] for s in zero)
    assert len(novel) == 3 * DTD_TEST_COUNT and len(base) == 4 * DTD_TEST_COUNT
    # The val split misses class 6 but still divides 4/3 (decided on the class list).
    val_novel = subsample_classes(load(coop_root, "dtd", "val"), "novel")
    assert val_novel.classnames == DTD_CLASSES[4:] and len(val_novel) == 2


def test_dtd_few_shot_seeds(coop_root):
    train = load(coop_root, "dtd", "train").samples
    draws = {}
    for seed in (1, 2, 3):
        picked = few_shot(train, 2, seed)
        assert Counter(s.label for s in picked) == {i: 2 for i in range(len(DTD_TRAIN_COUNTS))}
        # The 1-image class is drawn with replacement, as Dassl's generate_fewshot_dataset(repeat=True).
        assert [s for s in picked if s.label == 6] == 2 * [s for s in train if s.label == 6]
        assert few_shot(train, 2, seed) == picked
        draws[seed] = tuple(s.key for s in picked)
    assert len(set(draws.values())) > 1


def test_label_with_two_names_is_rejected(tmp_path):
    ds = tmp_path / "dtd"
    (ds / "images").mkdir(parents=True)
    rows = {"train": [["a/1.jpg", 0, "banded"]], "val": [], "test": [["a/2.jpg", 0, "blotchy"]]}
    (ds / "split_zhou_DescribableTextures.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(KdpromptError, match="two class names"):
        load(tmp_path, "dtd", "train")


# The published CoOp layout, written out independently of COOP_LAYOUT so that a typo there fails here.
JSON_LAYOUTS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}


@pytest.mark.parametrize("dataset", sorted(JSON_LAYOUTS))
def test_json_layout_paths(tmp_path, dataset):
    folder, image_dir, split_file = JSON_LAYOUTS[dataset]
    ds = tmp_path / folder
    images = ds / image_dir if image_dir else ds
    images.mkdir(parents=True)
    rows = [["x/a.jpg", 0, "class a"], ["y/b.jpg", 1, "class b"]]
    (ds / split_file).write_text(json.dumps({"train": rows, "val": rows[:1], "test": rows}), encoding="utf-8")
    assert coop_paths(tmp_path, dataset) == (ds, images, ds / split_file)
    split = load(tmp_path, dataset, "val")
    assert split.classnames == ["class a", "class b"]
    assert [Path(s.image) for s in split.samples] == [images / "x" / "a.jpg"]


# --- ImageNet ---------------------------------------------------------------------------------------


def test_imagenet_layout(coop_root):
    names = [n for _, n in IMAGENET_CLASSES]
    train = load(coop_root, "imagenet", "train")
    assert train.classnames == names
    assert len(train) == IMAGENET_TRAIN_PER_CLASS * len(names)
    # Label = position of the wnid in classnames.txt (the file lists n02... first).
    for s in train.samples:
        wnid = s.key.split("/")[1]
        assert s.label == [w for w, _ in IMAGENET_CLASSES].index(wnid)
        assert s.classname == names[s.label]
        assert s.key.startswith("train/") and s.key.endswith(".JPEG")
    assert [s.label for s in train.samples] == sorted(s.label for s in train.samples)
    test = load(coop_root, "imagenet", "test")
    assert len(test) == IMAGENET_VAL_PER_CLASS * len(names)
    assert all(s.key.startswith("val/") for s in test.samples)
    assert load_image(test.samples[0]).mode == "RGB"
    val = load(coop_root, "imagenet", "val")
    assert len(val) == 0 and val.classnames == names and "test" in val.meta["note"]


def test_imagenet_unknown_folder(tmp_path):
    make_imagenet(tmp_path)
    write_image(tmp_path / "imagenet" / "images" / "val" / "n09999999" / "x.JPEG", fmt="JPEG")
    with pytest.raises(KdpromptError, match="n09999999"):
        load(tmp_path, "imagenet", "test")
    assert len(load(tmp_path, "imagenet", "train")) == IMAGENET_TRAIN_PER_CLASS * len(IMAGENET_CLASSES)


# --- FGVC-Aircraft ----------------------------------------------------------------------------------


def test_aircraft_layout(coop_root):
    for split, rows in AIRCRAFT_SPLITS.items():
        data = load(coop_root, "fgvc_aircraft", split)
        assert data.classnames == AIRCRAFT_VARIANTS
        assert [(s.key, s.label) for s in data.samples] == [(f"{i}.jpg", lab) for i, lab in rows]
        for s in data.samples:
            assert s.classname == AIRCRAFT_VARIANTS[s.label]
            assert Path(s.image) == coop_root / "fgvc_aircraft" / "images" / s.key
    assert "Cessna 172" in {s.classname for s in load(coop_root, "fgvc_aircraft", "val").samples}


def test_aircraft_unknown_variant(tmp_path):
    make_aircraft(tmp_path)
    path = tmp_path / "fgvc_aircraft" / "images_variant_test.txt"
    path.write_text(path.read_text(encoding="utf-8") + "3000009 Boeing 999\n", encoding="utf-8")
    with pytest.raises(KdpromptError, match=r"images_variant_test.txt:4: variant 'Boeing 999'"):
        load(tmp_path, "fgvc_aircraft", "test")


# --- errors -----------------------------------------------------------------------------------------


def test_unknown_split(coop_root):
    with pytest.raises(KdpromptError, match="train, val, test"):
        load(coop_root, "dtd", "validation")


@pytest.mark.parametrize(
    ("maker", "dataset", "split", "remove"),
    [
        (make_dtd, "dtd", "train", "dtd/split_zhou_DescribableTextures.json"),
        (make_dtd, "dtd", "test", "dtd/images"),
        (make_dtd, "dtd", "train", "dtd"),
        (make_imagenet, "imagenet", "train", "imagenet/classnames.txt"),
        (make_imagenet, "imagenet", "test", "imagenet/images/val"),
        (make_aircraft, "fgvc_aircraft", "val", "fgvc_aircraft/images_variant_val.txt"),
        (make_aircraft, "fgvc_aircraft", "train", "fgvc_aircraft/variants.txt"),
    ],
)
def test_missing_files_name_the_path(tmp_path, maker, dataset, split, remove):
    maker(tmp_path)
    target = tmp_path / remove
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(KdpromptError) as info:
        load(tmp_path, dataset, split)
    msg = str(info.value)
    assert str(target) in msg and "DATASETS.md" in msg
    # A missing parent is reported alone, not with each of its children.
    assert msg.count(str(target)) == 1


def test_missing_root_reports_dataset_folder(tmp_path):
    with pytest.raises(KdpromptError) as info:
        load(tmp_path / "nowhere", "sun397", "train")
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "sun397") in msg
    assert str(tmp_path / "nowhere" / "sun397" / "SUN397") not in msg
