"""Command-line overrides: ``key.sub=value`` pairs applied to a recipe's raw mapping before validation."""

from __future__ import annotations

from typing import Any

import yaml

from kdprompt.errors import KdpromptError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise KdpromptError(f"Command-line overrides must be in the form of key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError):  # ValueError: int() of thousands of digits
        value = raw
    return key.split("."), value


def _tree_copy(node: Any) -> Any:
    """Copy nested dicts/lists without keeping shared references (YAML anchors become independent)."""
    if isinstance(node, dict):
        return {k: _tree_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_tree_copy(v) for v in node]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set.

    Missing sections are created; an integer part indexes a list (``eval.0.split=val``).
    """
    out = _tree_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = out
        for i, key in enumerate(keys):
            where = ".".join(keys[: i + 1])
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not (key.isascii() and key.isdigit()) or int(key) >= len(node):
                    raise KdpromptError(
                        f"override {text!r}: {'.'.join(keys[:i])} is a list of {len(node)}; "
                        f"use an index 0..{len(node) - 1}, got {key!r}"
                    )
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
                continue
            if not isinstance(node, dict):
                raise KdpromptError(f"override {text!r}: {where} is inside a value ({node!r}), not a section")
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return out
