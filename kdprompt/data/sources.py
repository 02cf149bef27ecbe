"""The built-in data sources, registered, and the recipe field that picks one by ``data.source``."""

from __future__ import annotations

from kdprompt.config.base import registered
from kdprompt.data import coop, folder, shards, synthetic  # noqa: F401  (each registers its source)
from kdprompt.data.source import SOURCES, DataSource
from kdprompt.data.types import Split

DataConfig = registered(lambda: SOURCES, "source")
"""A ``data:`` recipe section: the config of the registered source its ``source`` key names."""


def load_split(cfg: DataSource, split: str) -> Split:
    """Load split ``split`` ("train", "val", "test") of the source described by ``cfg``."""
    return cfg.load_split(split)


def source_names() -> list[str]:
    """Names of the registered data sources (built-ins and any registered since)."""
    return SOURCES.names()


__all__ = ["SOURCES", "DataConfig", "DataSource", "load_split", "source_names"]
