"""Recipe models of the data sources (``data.source`` picks one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class StrictModel(BaseModel):
    """Base of every recipe model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FolderData(StrictModel):
    """Class-per-subfolder images: ``root/<split>/<class>/*.jpg`` (or ``root/<class>/*`` for train)."""

    source: Literal["folder"] = "folder"
    root: Path


class CoopData(StrictModel):
    """One of the 11 CoOp base-to-novel datasets in the CoOp/Dassl layout under ``root``."""

    source: Literal["coop"] = "coop"
    root: Path
    dataset: Literal[COOP_DATASETS]  # type: ignore[valid-type]


class ShardsData(StrictModel):
    """Webdataset shards, one brace pattern (or list of patterns) per split."""

    source: Literal["shards"] = "shards"
    train: str | list[str] | None = None
    val: str | list[str] | None = None
    test: str | list[str] | None = None
    classnames: Path | None = Field(
        default=None,
        description="class names file (one per line, or JSON list); default: classnames.json beside the shards",
    )


class SyntheticData(StrictModel):
    """The built-in synthetic world of coloured shapes, materialised under ``root`` on first use."""

    source: Literal["synthetic"] = "synthetic"
    root: Path = Path("cache/synthetic")
    domain: Literal["pretrain", "downstream"] = "downstream"
    seed: int = 0
    image_size: int = Field(default=32, ge=16, le=256)
    train_per_class: int = Field(default=64, ge=1)
    val_per_class: int = Field(default=8, ge=0)
    test_per_class: int = Field(default=32, ge=1)


DataConfig = Annotated[
    FolderData | CoopData | ShardsData | SyntheticData,
    Field(discriminator="source"),
]
