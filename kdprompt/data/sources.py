"""The data-source registry: ``load_split(cfg, "train")`` for any ``data.source``."""

from __future__ import annotations

from collections.abc import Callable

from kdprompt.data.types import Split
from kdprompt.registry import Registry

SplitLoader = Callable[..., Split]
SOURCES: Registry[SplitLoader] = Registry("data source")


def _register_builtin_sources() -> None:
    # Imported lazily: each module registers itself into SOURCES on import.
    from kdprompt.data import coop, folder, shards, synthetic  # noqa: F401


def load_split(cfg, split: str) -> Split:
    """Load split ``split`` ("train", "val", "test") of the source described by ``cfg``."""
    _register_builtin_sources()
    return SOURCES.get(cfg.source)(cfg, split)
