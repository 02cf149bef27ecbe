"""Classifying image files with a bundle, batch by batch, skipping the files that are not images.

What ``kdprompt predict`` runs: a file that cannot be read as an image is reported and skipped, the
others are still classified.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdprompt.errors import KdpromptError

if TYPE_CHECKING:
    import torch

    from kdprompt.deploy.bundle import Bundle, Prediction


@dataclass(frozen=True)
class Skipped:
    """A file that could not be read as an image, and why."""

    image: str
    error: str


def iter_input_files(inputs: Iterable[Path]) -> Iterator[Path]:
    """The files named, and every non-hidden file under the directories named (sorted, recursive).

    Every file is yielded, images or not: :func:`predict_files` reports those it cannot read by name.

    Raises:
        KdpromptError: an input does not exist.
    """
    for item in inputs:
        if item.is_dir():
            for path in sorted(item.rglob("*")):
                rel = path.relative_to(item)
                if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                    yield path
        elif item.exists():
            yield item
        else:
            raise KdpromptError(f"{item} does not exist; give image files or directories of images")


def predict_files(
    bundle: Bundle, files: Iterable[Path], k: int = 5, batch_size: int = 64
) -> Iterator[Prediction | Skipped]:
    """The top-``k`` classes of each file (its path as ``source``), or a :class:`Skipped` for it.

    Files are preprocessed one by one and classified ``batch_size`` at a time; a skipped file is
    yielded at once, so it may come before the predictions of the files pending before it.
    """
    import torch

    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> list[Prediction]:
        if not pending:
            return []
        batch = torch.stack([t for _, t in pending])
        predictions = bundle.predict_tensor(batch, k, [n for n, _ in pending])
        pending.clear()
        return predictions

    for path in files:
        try:
            pending.append((str(path), bundle.preprocess(path, str(path))))
        except KdpromptError as e:
            yield Skipped(str(path), str(e))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
