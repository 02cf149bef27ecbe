"""The 11 CoOp base-to-novel datasets, read exactly as laid out by CoOp/Dassl's DATASETS.md.

Nine datasets are defined by CoOp's ``split_zhou_*.json`` files; ImageNet by its folders plus
``classnames.txt``; FGVC-Aircraft by ``variants.txt`` and ``images_variant_{split}.txt``.
:data:`COOP_LAYOUT` is the single source of truth for where each one lives under ``root``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

from kdprompt.data.folder import is_image_file
from kdprompt.data.source import SOURCES, DataSource
from kdprompt.data.splitfile import classnames_from_samples, read_split_file
from kdprompt.data.types import SPLITS, Sample, Split
from kdprompt.errors import KdpromptError

COOP_DATASETS = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)

DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


class CoopLayout(NamedTuple):
    """Where one dataset lives under the data root.

    Attributes:
        folder: the dataset folder under ``root``.
        image_dir: the image folder under ``folder`` ("" = ``folder`` itself).
        split_file: the file under ``folder`` that defines classes and splits: a ``split_zhou_*.json``,
            or ImageNet's ``classnames.txt``, or FGVC-Aircraft's ``variants.txt`` (whose per-split
            lists are :data:`AIRCRAFT_SPLIT_FILE`).
    """

    folder: str
    image_dir: str
    split_file: str


COOP_LAYOUT: dict[str, CoopLayout] = {
    "imagenet": CoopLayout("imagenet", "images", "classnames.txt"),
    "caltech101": CoopLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoopLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": CoopLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": CoopLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoopLayout("food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": CoopLayout("fgvc_aircraft", "images", "variants.txt"),
    "sun397": CoopLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": CoopLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoopLayout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": CoopLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
# The recipe schema and this table must name the same datasets.
assert set(COOP_LAYOUT) == set(COOP_DATASETS), "COOP_LAYOUT and COOP_DATASETS disagree"

AIRCRAFT_SPLIT_FILE = "images_variant_{split}.txt"
# CoOp evaluates ImageNet on its official val set, so "test" reads images/val; there is no
# held-out val split, and we refuse to alias it to test (model selection must never see test).
IMAGENET_SPLIT_DIRS = {"train": "train", "test": "val"}
IMAGENET_NO_VAL = (
    "ImageNet has no val split in the CoOp layout (images/val is the test set); "
    "select models on another split, never on test"
)


def coop_paths(root: Path, dataset: str) -> tuple[Path, Path, Path]:
    """Return ``(dataset_dir, image_dir, split_file)`` for ``dataset`` under ``root``."""
    layout = COOP_LAYOUT[dataset]
    dataset_dir = Path(root).expanduser() / layout.folder
    image_dir = dataset_dir / layout.image_dir if layout.image_dir else dataset_dir
    return dataset_dir, image_dir, dataset_dir / layout.split_file


def _require(dataset: str, paths: list[Path]) -> None:
    """Raise one error naming every missing path (only the top one when a parent is missing)."""
    missing: list[Path] = []
    for p in paths:
        if p.exists() or any(m in p.parents for m in missing):
            continue
        missing.append(p)
    if missing:
        listed = "\n  ".join(str(p) for p in missing)
        raise KdpromptError(
            f"coop dataset {dataset!r}: expected\n  {listed}\nnot found; prepare the dataset as described in "
            f"CoOp's DATASETS.md ({DATASETS_MD}) and point data.root at the folder that contains "
            f"{COOP_LAYOUT[dataset].folder}/"
        )


def load_coop_split(cfg: CoopData, split: str) -> Split:
    """Load split ``split`` of the CoOp dataset ``cfg.dataset`` under ``cfg.root``.

    Labels and class names are shared by all splits of a dataset. ImageNet's "val" is an empty split
    (with ``meta["note"]``), since its only held-out images are the test set.

    Raises:
        KdpromptError: unknown split, or a missing folder / split file / class-names file.
    """
    if split not in SPLITS:
        raise KdpromptError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    dataset = cfg.dataset
    if dataset not in COOP_LAYOUT:
        raise KdpromptError(f"unknown coop dataset {dataset!r}; choose one of {', '.join(COOP_LAYOUT)}")
    dataset_dir, image_dir, split_file = coop_paths(cfg.root, dataset)
    if dataset == "imagenet":
        samples, classnames, meta = _imagenet(dataset_dir, image_dir, split_file, split)
    elif dataset == "fgvc_aircraft":
        samples, classnames, meta = _aircraft(dataset_dir, image_dir, split_file, split)
    else:
        _require(dataset, [dataset_dir, image_dir, split_file])
        splits = read_split_file(split_file, image_dir)
        if split not in splits:
            raise KdpromptError(
                f"split file {split_file} has no {split!r} list (has: {', '.join(splits) or 'none'})"
            )
        # Every split must index the same class list, even one that lacks some classes.
        classnames = classnames_from_samples([s for name in SPLITS for s in splits.get(name, [])])
        samples, meta = splits[split], {}
    meta = {"source": "coop", "dataset": dataset, "root": str(dataset_dir), **meta}
    return Split(samples=samples, classnames=classnames, name=split, meta=meta)


def _imagenet(
    dataset_dir: Path, image_dir: Path, classnames_file: Path, split: str
) -> tuple[list[Sample], list[str], dict]:
    _require("imagenet", [dataset_dir, classnames_file])
    wnids, classnames = _read_imagenet_classnames(classnames_file)
    if split not in IMAGENET_SPLIT_DIRS:
        return [], classnames, {"note": IMAGENET_NO_VAL}
    split_dir = image_dir / IMAGENET_SPLIT_DIRS[split]
    _require("imagenet", [image_dir, split_dir])
    label_of = {w: i for i, w in enumerate(wnids)}
    samples: list[Sample] = []
    with os.scandir(split_dir) as it:
        folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    unknown = [f for f in folders if f not in label_of]
    if unknown:
        raise KdpromptError(
            f"{split_dir} has class folders not listed in {classnames_file}: {', '.join(unknown[:10])}"
            + (" ..." if len(unknown) > 10 else "")
        )
    for wnid in sorted(folders, key=label_of.__getitem__):
        label = label_of[wnid]
        with os.scandir(split_dir / wnid) as it:
            names = sorted(e.name for e in it if e.is_file() and is_image_file(e.name))
        rel_dir = f"{IMAGENET_SPLIT_DIRS[split]}/{wnid}"
        samples.extend(
            Sample(str(split_dir / wnid / n), label, classnames[label], key=f"{rel_dir}/{n}") for n in names
        )
    return samples, classnames, {}


def _read_imagenet_classnames(path: Path) -> tuple[list[str], list[str]]:
    """``(wnids, classnames)`` from lines ``"n01440764 tench"``; label = line order."""
    wnids: list[str] = []
    names: list[str] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2:
            raise KdpromptError(f"{path}:{i}: expected '<wnid> <class name>', got {line!r}")
        if parts[0] in wnids:
            raise KdpromptError(f"{path}:{i}: wnid {parts[0]} is listed twice")
        wnids.append(parts[0])
        names.append(parts[1].strip())
    if not wnids:
        raise KdpromptError(f"{path} lists no classes")
    return wnids, names


def _aircraft(
    dataset_dir: Path, image_dir: Path, variants_file: Path, split: str
) -> tuple[list[Sample], list[str], dict]:
    list_file = dataset_dir / AIRCRAFT_SPLIT_FILE.format(split=split)
    _require("fgvc_aircraft", [dataset_dir, image_dir, variants_file, list_file])
    classnames = [
        " ".join(ln.split()) for ln in variants_file.read_text(encoding="utf-8").splitlines() if ln.strip()
    ]
    if not classnames:
        raise KdpromptError(f"{variants_file} lists no variants")
    label_of = {c: i for i, c in enumerate(classnames)}
    samples: list[Sample] = []
    for i, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        # Variant names contain spaces ("Cessna 172"); CoOp joins every field after the image id.
        variant = " ".join(parts[1].split()) if len(parts) == 2 else ""
        if variant not in label_of:
            raise KdpromptError(
                f"{list_file}:{i}: variant {variant!r} is not listed in {variants_file}"
                if variant
                else f"{list_file}:{i}: expected '<image id> <variant>', got {line!r}"
            )
        name = f"{parts[0]}.jpg"
        samples.append(Sample(str(image_dir / name), label_of[variant], variant, key=name))
    return samples, classnames, {}


__all__ = [
    "AIRCRAFT_SPLIT_FILE",
    "COOP_LAYOUT",
    "DATASETS_MD",
    "IMAGENET_NO_VAL",
    "CoopLayout",
    "coop_paths",
    "load_coop_split",
]


@SOURCES.register("coop")
class CoopData(DataSource):
    """One of the 11 CoOp base-to-novel datasets in the CoOp/Dassl layout under ``root``."""

    source: Literal["coop"] = "coop"
    root: Path
    dataset: Literal[COOP_DATASETS]  # type: ignore[valid-type]

    def load_split(self, split: str) -> Split:
        """See :func:`load_coop_split`."""
        return load_coop_split(self, split)
