"""What a data source is: a recipe config that loads its own splits, and the registry of sources.

A source is one file: a :class:`DataSource` subclass with a ``source: Literal["name"]`` tag and its
settings, registered with ``@SOURCES.register("name")``. Recipes pick it by ``data.source``;
``kdprompt shards``, ``kdprompt eval --data`` and the shard materialiser use it through this interface
and never test a source's name.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kdprompt.config.base import StrictModel
from kdprompt.data.types import Split
from kdprompt.registry import Registry


class DataSource(StrictModel):
    """Base of every data source config."""

    source: str
    shard_image_format: ClassVar[str] = "jpg"
    """How its images are encoded when the source is written to shards (photos keep JPEG)."""

    def load_split(self, split: str) -> Split:
        """Split ``split`` ("train", "val", "test") of this source."""
        raise NotImplementedError

    def shard_urls(self, split: str) -> list[str] | None:
        """The shards holding ``split`` when the source already is shards, else None (they get written)."""
        return None

    def identity(self) -> dict[str, Any]:
        """What the data's content depends on, for recipe fingerprints (not where it is stored)."""
        return self.model_dump(mode="json")


SOURCES: Registry[type[DataSource]] = Registry("data source")
