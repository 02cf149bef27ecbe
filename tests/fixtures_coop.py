"""Tiny fake datasets in the real CoOp/Dassl layouts (DTD-like JSON split, ImageNet, FGVC-Aircraft)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

DTD_CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed"]
# Uneven on purpose: classes with fewer than 2 train images test "take all when fewer".
DTD_TRAIN_COUNTS = [5, 4, 3, 3, 2, 2, 1]
DTD_TEST_COUNT = 2
# The last class has no val image: the val split must still index all 7 classes.
DTD_VAL_CLASSES = 6

# classnames.txt order is deliberately not sorted: the label follows the file, not the folders.
IMAGENET_CLASSES = [("n02000002", "goldfish"), ("n01000001", "tench"), ("n03000003", "great white shark")]
IMAGENET_TRAIN_PER_CLASS = 3
IMAGENET_VAL_PER_CLASS = 2

AIRCRAFT_VARIANTS = ["707-320", "Cessna 172", "A300B4"]
AIRCRAFT_SPLITS = {
    "train": [("1000001", 0), ("1000002", 0), ("1000003", 1), ("1000004", 2), ("1000005", 2)],
    "val": [("2000001", 1), ("2000002", 2)],
    "test": [("3000001", 0), ("3000002", 1), ("3000003", 2)],
}


def write_image(path: Path, value: int = 128, fmt: str | None = None) -> None:
    """Write an 8x8 RGB image (format from the extension unless ``fmt`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value % 256, (3 * value) % 256, (7 * value) % 256)).save(path, format=fmt)


def make_dtd(root: Path) -> Path:
    """Write ``root/dtd/images/<class>/<img>.jpg`` and ``split_zhou_DescribableTextures.json``."""
    dataset_dir = root / "dtd"
    image_dir = dataset_dir / "images"
    splits: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    counter = 0
    for label, name in enumerate(DTD_CLASSES):
        counts = {
            "train": DTD_TRAIN_COUNTS[label],
            "val": 1 if label < DTD_VAL_CLASSES else 0,
            "test": DTD_TEST_COUNT,
        }
        for split, count in counts.items():
            for _ in range(count):
                counter += 1
                rel = f"{name}/{name}_{counter:04d}.jpg"
                write_image(image_dir / rel, counter)
                splits[split].append([rel, label, name])
    (dataset_dir / "split_zhou_DescribableTextures.json").write_text(json.dumps(splits), encoding="utf-8")
    return root


def make_imagenet(root: Path) -> Path:
    """Write ``root/imagenet/images/{train,val}/n*/`` and ``classnames.txt``."""
    dataset_dir = root / "imagenet"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{wnid} {name}" for wnid, name in IMAGENET_CLASSES]
    (dataset_dir / "classnames.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, count in (("train", IMAGENET_TRAIN_PER_CLASS), ("val", IMAGENET_VAL_PER_CLASS)):
        for i, (wnid, _) in enumerate(IMAGENET_CLASSES):
            for j in range(count):
                write_image(
                    dataset_dir / "images" / split / wnid / f"{wnid}_{j}.JPEG", 10 * i + j, fmt="JPEG"
                )
            # Non-image files in a class folder are ignored.
            (dataset_dir / "images" / split / wnid / "notes.txt").write_text("x", encoding="utf-8")
    return root


def make_aircraft(root: Path) -> Path:
    """Write ``root/fgvc_aircraft/images/<id>.jpg``, ``variants.txt`` and ``images_variant_*.txt``."""
    dataset_dir = root / "fgvc_aircraft"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n", encoding="utf-8")
    for split, rows in AIRCRAFT_SPLITS.items():
        for image_id, _ in rows:
            write_image(dataset_dir / "images" / f"{image_id}.jpg", int(image_id) % 97)
        text = "".join(f"{image_id} {AIRCRAFT_VARIANTS[label]}\n" for image_id, label in rows)
        (dataset_dir / f"images_variant_{split}.txt").write_text(text, encoding="utf-8")
    return root
