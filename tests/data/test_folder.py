"""The class-per-subfolder source (kdprompt.data.folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_coop import write_image

from kdprompt.data.folder import FolderData, load_folder_split, split_dirs
from kdprompt.data.sources import SOURCES
from kdprompt.data.types import load_image
from kdprompt.errors import KdpromptError


def load(root: Path, split: str):
    return load_folder_split(FolderData(root=root), split)


def make_tree(root: Path, layout: dict[str, list[str]]) -> None:
    """Write ``root/<rel>`` images for every ``rel`` listed under each key's folder."""
    for folder, files in layout.items():
        for i, name in enumerate(files):
            write_image(root / folder / name, i)


def test_registered():
    assert SOURCES.get("folder") is FolderData


def test_split_folders_round_trip(tmp_path):
    make_tree(
        tmp_path,
        {
            # Written out of order: the reader sorts classes and files.
            "train/zebra": ["b.jpg", "a.PNG"],
            "train/golden_retriever": ["x.jpeg", "sub/y.webp", "z.BMP"],
            "train/ant": ["1.jpg"],
            "test/golden_retriever": ["t.jpg"],
            "test/zebra": ["u.png"],
        },
    )
    (tmp_path / "train" / "zebra" / "readme.txt").write_text("not an image", encoding="utf-8")
    write_image(tmp_path / "train" / "zebra" / ".hidden.jpg")
    (tmp_path / "train" / "empty_class").mkdir()

    train = load(tmp_path, "train")
    assert train.classnames == ["ant", "empty class", "golden retriever", "zebra"]
    assert [(s.key, s.label) for s in train.samples] == [
        ("train/ant/1.jpg", 0),
        ("train/golden_retriever/x.jpeg", 2),
        ("train/golden_retriever/z.BMP", 2),
        ("train/golden_retriever/sub/y.webp", 2),
        ("train/zebra/a.PNG", 3),
        ("train/zebra/b.jpg", 3),
    ]
    assert all(s.classname == train.classnames[s.label] for s in train.samples)
    assert all(Path(s.image) == tmp_path / s.key for s in train.samples)
    assert load_image(train.samples[0]).size == (8, 8)
    assert load(tmp_path, "train").samples == train.samples  # deterministic

    test = load(tmp_path, "test")
    # The test split has only two class folders but shares the train labelling.
    assert test.classnames == train.classnames
    assert [(s.key, s.label, s.classname) for s in test.samples] == [
        ("test/golden_retriever/t.jpg", 2, "golden retriever"),
        ("test/zebra/u.png", 3, "zebra"),
    ]


def test_flat_root_is_train(tmp_path):
    make_tree(tmp_path, {"cat": ["1.jpg"], "dog": ["2.jpg", "3.jpg"]})
    assert split_dirs(tmp_path) == {"train": tmp_path}
    train = load(tmp_path, "train")
    assert train.classnames == ["cat", "dog"]
    assert [s.key for s in train.samples] == ["cat/1.jpg", "dog/2.jpg", "dog/3.jpg"]
    with pytest.raises(KdpromptError, match=r"no 'val' split.*splits found: train"):
        load(tmp_path, "val")


def test_missing_split_lists_existing(tmp_path):
    make_tree(tmp_path, {"train/a": ["1.jpg"], "test/a": ["2.jpg"]})
    with pytest.raises(KdpromptError) as info:
        load(tmp_path, "val")
    msg = str(info.value)
    assert str(tmp_path / "val") in msg and "train, test" in msg


def test_no_train_dir_uses_requested_split_classes(tmp_path):
    make_tree(tmp_path, {"test/b_c": ["1.jpg"], "test/a": ["2.jpg"]})
    test = load(tmp_path, "test")
    assert test.classnames == ["a", "b c"] and [s.label for s in test.samples] == [0, 1]
    with pytest.raises(KdpromptError, match="splits found: test"):
        load(tmp_path, "train")


def test_unknown_class_in_eval_split(tmp_path):
    make_tree(tmp_path, {"train/a": ["1.jpg"], "val/a": ["2.jpg"], "val/mystery": ["3.jpg"]})
    with pytest.raises(KdpromptError) as info:
        load(tmp_path, "val")
    assert str(tmp_path / "val" / "mystery" / "3.jpg") in str(info.value)
    # An empty unknown folder holds no image to mislabel: ignored.
    (tmp_path / "val" / "mystery" / "3.jpg").unlink()
    assert [s.key for s in load(tmp_path, "val").samples] == ["val/a/2.jpg"]


def test_errors(tmp_path):
    with pytest.raises(KdpromptError, match="train, val, test"):
        load(tmp_path, "dev")
    with pytest.raises(KdpromptError, match="not found"):
        load(tmp_path / "missing", "train")
    with pytest.raises(KdpromptError, match="splits found: none"):
        load(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(KdpromptError, match="no class folders"):
        load(tmp_path, "train")
    make_tree(tmp_path, {"train/a_b": ["1.jpg"], "train/a b": ["2.jpg"]})
    with pytest.raises(KdpromptError, match="duplicate class names: a b"):
        load(tmp_path, "train")
