"""CoOp's split-file format: ``{"train"|"val"|"test": [[relative_path, label, classname], ...]}``.

kdprompt also writes (and reads) an optional fourth element, the caption, for captioned data.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdprompt.data.types import SPLITS, Sample
from kdprompt.errors import KdpromptError


def read_split_file(path: Path, image_dir: Path) -> dict[str, list[Sample]]:
    """Read a split JSON; image paths are resolved against ``image_dir``.

    Raises:
        KdpromptError: the file is missing or not in the split format (the message names the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise KdpromptError(
            f"split file not found: {path}; download it from the CoOp repository (DATASETS.md)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise KdpromptError(f"split file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise KdpromptError(f"split file {path} must map split names to lists, got {type(raw).__name__}")
    out: dict[str, list[Sample]] = {}
    for split, entries in raw.items():
        samples = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, list | tuple) or len(entry) not in (3, 4):
                raise KdpromptError(
                    f"split file {path}: {split}[{i}] must be [relative_path, label, classname(, caption)],"
                    f" got {entry!r}"
                )
            rel, label, classname = entry[0], int(entry[1]), str(entry[2])
            caption = str(entry[3]) if len(entry) == 4 else None
            samples.append(Sample(str(Path(image_dir) / rel), label, classname, caption, key=str(rel)))
        out[split] = samples
    return out


def write_split_file(path: Path, splits: dict[str, list[Sample]], image_dir: Path) -> None:
    """Write ``splits`` in the split-file format, paths relative to ``image_dir`` (not atomic: callers wrap)."""
    data = {}
    for split, samples in splits.items():
        rows = []
        for s in samples:
            rel = str(Path(s.image).relative_to(image_dir)) if isinstance(s.image, str) else s.key
            row = [rel, s.label, s.classname]
            if s.caption is not None:
                row.append(s.caption)
            rows.append(row)
        data[split] = rows
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def classnames_from_samples(samples: list[Sample]) -> list[str]:
    """Class names indexed by label, checking that each label has one name."""
    names: dict[int, str] = {}
    for s in samples:
        if names.setdefault(s.label, s.classname) != s.classname:
            raise KdpromptError(
                f"label {s.label} has two class names: {names[s.label]!r} and {s.classname!r}"
            )
    n = max(names, default=-1) + 1
    missing = [i for i in range(n) if i not in names]
    if missing:
        raise KdpromptError(f"labels {missing[:10]} have no samples; cannot name them")
    return [names[i] for i in range(n)]


__all__ = ["SPLITS", "classnames_from_samples", "read_split_file", "write_split_file"]
