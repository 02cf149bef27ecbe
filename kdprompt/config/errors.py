"""One readable message for an invalid recipe: every problem with its dotted field, value and choices."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from kdprompt.config.base import RegisteredBy


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types (and registry markers) behind Optional/Union/Annotated/list/dict annotations."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        args = get_args(annotation)
        markers = [m for m in args[1:] if isinstance(m, RegisteredBy)]
        return markers or _unwrap(args[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [t for arg in get_args(annotation) for t in _unwrap(arg)]
    if origin is dict:
        return _unwrap(get_args(annotation)[1])
    return [annotation]


def _owner(annotation: Any, raw: Any, key: Any) -> type[BaseModel] | None:
    """The model that validates the value at ``raw`` (the raw recipe value under this field)."""
    for t in _unwrap(annotation):
        if isinstance(t, RegisteredBy):
            name = raw.get(t.tag) if t.tag is not None and isinstance(raw, dict) else key
            return t.model_for(name)
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _annotation(model: type[BaseModel] | None, part: str) -> Any:
    """A field's annotation with its metadata (pydantic keeps ``Annotated`` extras apart)."""
    field = model.model_fields.get(part) if model is not None else None
    if field is None:
        return None
    return typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def _walk(model: type[BaseModel], loc: tuple[Any, ...], raw: Any) -> tuple[str, type[BaseModel] | None]:
    """Follow a pydantic error location to (dotted path, the model owning its end).

    ``raw`` is the recipe mapping as given: registry-backed fields (``data``, ``method``, ``objectives``)
    pick their model from the value's tag, as validation did.
    """
    parts: list[str] = []
    current: type[BaseModel] | None = model
    mapping_field: Any = None  # a registered-name mapping whose entry the next part names
    for part in loc:
        raw = raw[part] if isinstance(raw, dict | list) and _has(raw, part) else None
        if isinstance(part, int):
            parts.append(f"[{part}]")
            continue
        parts.append(str(part))
        if mapping_field is not None:
            current, mapping_field = _owner(mapping_field, raw, part), None
            continue
        annotation = _annotation(current, part)
        if any(isinstance(t, RegisteredBy) and t.tag is None for t in _unwrap(annotation)):
            mapping_field, current = annotation, None  # the next part (a registered name) picks the model
            continue
        current = _owner(annotation, raw, part) if annotation is not None else None
    return ".".join(parts).replace(".[", "["), current


def _has(container: dict | list, part: Any) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(part, int) and 0 <= part < len(container)


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], origin: str, raw: Any = None
) -> str:
    """One message listing every problem with its dotted field, bad value and allowed keys/values."""
    lines = [f"invalid recipe {origin}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = _walk(model, loc, raw)[0] or "(top level)"
        ctx = err.get("ctx", {})
        if err["type"] == "extra_forbidden":
            owner = _walk(model, loc[:-1], raw)[1]
            allowed = sorted(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {field}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"  {field}: required field is missing")
        elif err["type"] == "registry_tag_invalid":
            where = f"{field}.{ctx['tag']}" if ctx.get("tag") else field
            lines.append(f"  {where}: got {ctx.get('name')!r}; allowed: {ctx.get('allowed')}")
        else:
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
