"""Finding, reading and validating recipes.

A recipe is resolved in three steps: find the YAML (a built-in name such as ``demo/pretrain-teacher``
or a path), apply command-line overrides to the raw mapping, then validate against the command's
recipe model. Any error is one :class:`~kdprompt.errors.KdpromptError` naming the dotted field, the bad
value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kdprompt.config.errors import format_validation_error
from kdprompt.config.overrides import apply_overrides
from kdprompt.errors import KdpromptError

RECIPES_ENV = "KDPROMPT_RECIPES_DIR"

R = TypeVar("R", bound=BaseModel)


def recipes_dir() -> Path:
    """The directory of built-in recipes (``$KDPROMPT_RECIPES_DIR`` or the repository's ``recipes/``)."""
    env = os.environ.get(RECIPES_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe names (path below ``recipes/`` without ``.yaml``) mapped to their files."""
    root = recipes_dir()
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def find_recipe(name_or_path: str) -> Path:
    """Resolve a built-in recipe name or a YAML path to a file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise KdpromptError(f"recipe file not found: {path}")
        return path
    known = builtin_recipes()
    if name_or_path in known:
        return known[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(known), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise KdpromptError(
        f"no built-in recipe named {name_or_path!r} and no such file.{hint} "
        "List the built-in recipes with `kdprompt recipes`."
    )


MAX_RECIPE_VALUES = 100_000
"""The most values a recipe may expand to (YAML aliases counted each time they are used)."""


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Values in ``node`` once every alias is expanded, computed without expanding (aliases share objects)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a self-referencing alias counts once instead of recursing forever
    if isinstance(node, dict):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.items())
    elif isinstance(node, list):
        size = 1 + sum(_expanded_size(v, memo) for v in node)
    else:
        size = 1
    memo[key] = min(size, MAX_RECIPE_VALUES + 1)
    return memo[key]


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    """Parse a recipe file into a mapping.

    Raises:
        KdpromptError: the file is not UTF-8 text, not YAML, not a mapping, or expands (through YAML
            aliases) to more than :data:`MAX_RECIPE_VALUES` values.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise KdpromptError(
            f"recipe {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise KdpromptError(f"recipe {path} is not valid YAML: {exc}") from None
    except ValueError as exc:  # PyYAML's int() of a number with thousands of digits
        raise KdpromptError(
            f"recipe {path} has a value YAML cannot read: {exc}; quote it or shorten it"
        ) from None
    if _expanded_size(data, {}) > MAX_RECIPE_VALUES:
        raise KdpromptError(
            f"recipe {path} expands to more than {MAX_RECIPE_VALUES:,} values through YAML aliases "
            "(an alias bomb?); write the values out"
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KdpromptError(f"recipe {path} must be a YAML mapping of fields, got {type(data).__name__}")
    return data


def recipe_description(path: Path) -> str:
    """One-line description of a recipe file (its ``description`` field)."""
    try:
        data = read_recipe_yaml(path)
    except KdpromptError:
        return "(invalid YAML)"
    return str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""


def validate_recipe(model: type[R], data: dict[str, Any], origin: str = "") -> R:
    """Validate raw recipe data against ``model`` or raise a :class:`KdpromptError` with every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise KdpromptError(format_validation_error(exc, model, origin or model.__name__, data)) from None


def load_recipe(model: type[R], name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> R:
    """Find, parse, override and validate a recipe for one command."""
    path = find_recipe(name_or_path)
    data = apply_overrides(read_recipe_yaml(path), list(overrides))
    kind = data.get("recipe")
    expected = model.model_fields["recipe"].default if "recipe" in model.model_fields else None
    if expected is not None and kind not in (None, expected):
        raise KdpromptError(
            f"recipe {path} is a {kind!r} recipe, but this command needs a {expected!r} recipe; "
            f"run `kdprompt {kind} {name_or_path}` instead"
        )
    return validate_recipe(model, data, origin=str(path))


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML (what ``--dry-run`` prints and runs record)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
