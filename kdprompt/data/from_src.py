"""A validated data config from what a user names: a directory, a data YAML file or a source name.

``kdprompt shards SRC`` and ``kdprompt eval --data SRC`` take SRC plus ``key=value`` overrides; eval
can also start from the data config a trained model records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdprompt.config.loading import read_recipe_yaml, validate_recipe
from kdprompt.config.overrides import apply_overrides
from kdprompt.config.recipes import DataSection
from kdprompt.data.source import DataSource
from kdprompt.data.sources import source_names
from kdprompt.errors import KdpromptError


def src_kinds() -> str:
    """What SRC may be, for messages: ``a directory, a YAML file, or a source name (a, b, ...)``."""
    return f"a directory, a YAML file, or a source name ({', '.join(source_names())})"


def data_config_from_src(src: str, overrides: Sequence[str] = ()) -> DataSource:
    """The data config of SRC (a directory, a YAML file or a source name) with ``overrides`` applied.

    A directory is the ``folder`` source rooted there; a YAML file is a data config (a recipe's
    ``data:`` section, or a recipe with one); a source name starts from that source's defaults.

    Raises:
        KdpromptError: SRC is none of those, or the config is invalid.
    """
    path = Path(src)
    if path.is_dir():
        raw: dict[str, Any] = {"source": "folder", "root": str(path)}
    elif path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise KdpromptError(f"data config file not found: {path}")
        raw = read_recipe_yaml(path)
        raw = raw.get("data", raw)
    elif src in source_names():
        raw = {"source": src}
    else:
        raise KdpromptError(f"SRC {src!r} is not {src_kinds()}")
    return _validated(raw, overrides, origin=f"data config {src}")


def data_config_from_record(recorded: dict[str, Any], overrides: Sequence[str], origin: str) -> DataSource:
    """The data config a model records (``recorded``, as JSON) with ``overrides`` applied."""
    return _validated(dict(recorded), overrides, origin=f"the data config of {origin}")


def _validated(raw: dict[str, Any], overrides: Sequence[str], origin: str) -> DataSource:
    raw = apply_overrides(raw, list(overrides))
    return validate_recipe(DataSection, {"data": raw}, origin=origin).data
