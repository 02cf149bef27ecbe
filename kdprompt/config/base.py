"""The base of every recipe model, and fields whose schema comes from a registry.

A registry-backed field (``data``, ``method``, one objective) holds the config model of the entry its
tag names, looked up when the recipe is validated: an entry registered after import (a plugin, a test)
is accepted like a built-in one, and the entry's own model reports unknown keys and bad values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainValidator, SerializeAsAny
from pydantic_core import PydanticCustomError

from kdprompt.registry import Registry


class StrictModel(BaseModel):
    """Base of every recipe model: unknown keys are errors, values are validated on assignment."""

    # allow_inf_nan=False: a weight or lr of 1e309 (inf) or nan is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def config_model(entry: Any) -> type[BaseModel]:
    """The recipe config of a registry entry: the entry itself when it is a model, else its ``Config``."""
    if isinstance(entry, type) and issubclass(entry, BaseModel):
        return entry
    model = getattr(entry, "Config", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"registry entry {entry!r} has no pydantic Config")
    return model


class RegisteredBy:
    """Field metadata: the value is the config of the ``registry`` entry named by its ``tag`` key.

    Args:
        registry: a callable returning the registry, so that built-ins are registered on first use.
        tag: the key naming the entry (``source``, ``name``); ``None`` when the name is given from outside
            (a mapping key, as for objectives).
    """

    def __init__(self, registry: Callable[[], Registry[Any]], tag: str | None) -> None:
        self.registry = registry
        self.tag = tag

    def model_for(self, name: Any) -> type[BaseModel] | None:
        """The config model registered under ``name``, or None."""
        registry = self.registry()
        return config_model(registry.get(name)) if isinstance(name, str) and name in registry else None

    def validate(self, value: Any, name: Any = None) -> BaseModel:
        """Validate ``value`` with the model its tag (or ``name``) picks; pydantic errors keep their paths."""
        registry = self.registry()
        if self.tag is not None:
            if isinstance(value, BaseModel):
                name = getattr(value, self.tag, None)
            elif isinstance(value, dict):
                name = value.get(self.tag)
            else:
                raise PydanticCustomError(
                    "registry_mapping", "expected a mapping with a `{tag}` key", {"tag": self.tag}
                )
            if name is None:
                raise PydanticCustomError(
                    "registry_tag_missing",
                    "`{tag}` is missing; set it to one of: {allowed}",
                    {"tag": self.tag, "allowed": ", ".join(registry.names())},
                )
        model = self.model_for(name)
        if model is None:
            raise PydanticCustomError(
                "registry_tag_invalid",
                "unknown {kind} {name!r}; allowed: {allowed}",
                {
                    "kind": registry.kind,
                    "name": name,
                    "tag": self.tag,
                    "allowed": ", ".join(registry.names()),
                },
            )
        if isinstance(value, model):
            return value
        if isinstance(value, BaseModel):
            value = value.model_dump()
        return model.model_validate({} if value is None else value)


def registered(registry: Callable[[], Registry[Any]], tag: str) -> Any:
    """An annotation for a field whose config model is picked by ``registry`` from the value's ``tag``."""
    marker = RegisteredBy(registry, tag)
    return Annotated[SerializeAsAny[StrictModel], PlainValidator(marker.validate), marker]
