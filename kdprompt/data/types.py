"""The labelled-sample types every source returns."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kdprompt.errors import KdpromptError

SPLITS = ("train", "val", "test")
# What counts as an image file when a folder is scanned (data sources, `kdprompt bench serve --images`).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        image: path of an image file, or the encoded image bytes (samples read from shards).
        label: class index into the owning :class:`Split`'s ``classnames``.
        classname: human-readable class name (``classnames[label]``).
        caption: free-text caption when the source has one (pre-training data), else ``None``.
        key: a stable identifier (relative path or shard key), used in messages and shard keys.
    """

    image: str | bytes
    label: int
    classname: str
    caption: str | None = None
    key: str = ""


@dataclass
class Split:
    """A labelled split: samples plus the class names their labels index."""

    samples: list[Sample]
    classnames: list[str]
    name: str = "train"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)


def decode_image(image: str | Path | bytes, what: str | None = None) -> Image.Image:
    """Decode an image file or encoded bytes to an RGB PIL image, or raise a :class:`KdpromptError` naming it.

    Args:
        image: a path, or the encoded bytes (JPEG, PNG, ...).
        what: how the image is named in errors (default: the path, or ``<bytes>``).
    """
    what = what or (str(image) if not isinstance(image, bytes) else "<bytes>")
    try:
        img = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else Image.open(Path(image))
        img.load()
    except FileNotFoundError:
        raise KdpromptError(f"image file not found: {what}") from None
    except IsADirectoryError:
        raise KdpromptError(f"{what} is a directory, not an image") from None
    except UnidentifiedImageError:
        raise KdpromptError(
            f"cannot decode image {what}: not an image format Pillow can read (e.g. JPEG, PNG, WebP)"
        ) from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise KdpromptError(f"cannot decode image {what}: {exc}") from None
    return img.convert("RGB")


def load_image(sample: Sample) -> Image.Image:
    """Decode ``sample.image`` to an RGB PIL image, or raise a :class:`KdpromptError` naming it."""
    what = sample.key or (sample.image if isinstance(sample.image, str) else "<bytes>")
    return decode_image(sample.image, what)
