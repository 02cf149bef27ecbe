"""Class-per-subfolder images: ``root/<split>/<class>/**/<image>``, or ``root/<class>/...`` as train.

The class list comes from the train split's folders (sorted), so every split shares one labelling;
a folder name's underscores become spaces in its class name ("golden_retriever" -> "golden retriever").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from kdprompt.data.source import SOURCES, DataSource
from kdprompt.data.types import IMAGE_SUFFIXES, SPLITS, Sample, Split
from kdprompt.errors import KdpromptError


def is_image_file(name: str) -> bool:
    """Whether ``name`` has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def classname_of(folder: str) -> str:
    """The class name of a class folder: underscores become spaces."""
    return folder.replace("_", " ")


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def _images_under(folder: Path) -> list[str]:
    """Image paths relative to ``folder``, recursive, in a deterministic (sorted, top-down) order."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # Sorting in place fixes the walk order; hidden folders (.ipynb_checkpoints ...) are skipped.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        for name in sorted(filenames):
            if is_image_file(name):
                out.append(name if rel == "." else f"{Path(rel).as_posix()}/{name}")
    return out


def split_dirs(root: Path) -> dict[str, Path]:
    """The splits available under ``root`` and their folders.

    ``root/<split>/`` folders win; without any, a root holding class folders is the train split.
    """
    found = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if not found and _subdirs(root):
        found["train"] = root
    return found


def load_folder_split(cfg: FolderData, split: str) -> Split:
    """Load split ``split`` of a class-per-subfolder image tree under ``cfg.root``.

    Raises:
        KdpromptError: unknown or absent split, no class folders, or images of a class the train
            split does not have.
    """
    if split not in SPLITS:
        raise KdpromptError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise KdpromptError(f"folder data root not found: {root}")
    dirs = split_dirs(root)
    if split not in dirs:
        have = ", ".join(dirs) if dirs else "none (no train/val/test folders and no class folders)"
        raise KdpromptError(
            f"folder data {root} has no {split!r} split (expected {root / split}/<class>/...); "
            f"splits found: {have}"
        )
    split_dir = dirs[split]
    # Labels come from the train classes so that every split agrees; without train, from this split.
    class_root = dirs.get("train", split_dir)
    folders = _subdirs(class_root)
    if not folders:
        raise KdpromptError(f"no class folders in {class_root}; expected {class_root}/<class>/<image>")
    classnames = [classname_of(f) for f in folders]
    dup = sorted({c for c in classnames if classnames.count(c) > 1})
    if dup:
        raise KdpromptError(f"class folders in {class_root} give duplicate class names: {', '.join(dup)}")
    label_of = {f: i for i, f in enumerate(folders)}

    samples: list[Sample] = []
    for folder in _subdirs(split_dir):
        images = _images_under(split_dir / folder)
        if folder not in label_of:
            if images:
                raise KdpromptError(
                    f"image {split_dir / folder / images[0]} is in class folder {folder!r}, which is not "
                    f"a class of {class_root} (classes: {', '.join(folders[:10])}"
                    f"{' ...' if len(folders) > 10 else ''})"
                )
            continue
        label = label_of[folder]
        for rel in images:
            path = split_dir / folder / rel
            samples.append(Sample(str(path), label, classnames[label], key=path.relative_to(root).as_posix()))
    meta = {"source": "folder", "root": str(root), "dir": str(split_dir)}
    return Split(samples=samples, classnames=classnames, name=split, meta=meta)


__all__ = ["classname_of", "is_image_file", "load_folder_split", "split_dirs"]


@SOURCES.register("folder")
class FolderData(DataSource):
    """Class-per-subfolder images: ``root/<split>/<class>/*.jpg`` (or ``root/<class>/*`` for train)."""

    source: Literal["folder"] = "folder"
    root: Path

    def load_split(self, split: str) -> Split:
        """See :func:`load_folder_split`."""
        return load_folder_split(self, split)
