"""A seeded fuzz of recipe overrides: every input ends in the resolved recipe or ONE clear error (exit 2).

Keys are drawn from the real recipes' own key paths (so values reach deep validators) and from junk;
values from a pool of hostile spellings (unicode digits, 5000-digit numbers, inf/nan, broken YAML,
YAML tags and aliases, control characters). Nothing may end in a traceback or another exit status.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from click.testing import CliRunner

from kdprompt.cli import main
from kdprompt.config.loading import find_recipe, read_recipe_yaml

pytestmark = pytest.mark.faults

RECIPES = {
    "distill": "demo/distill-student",
    "teacher": "demo/teacher-promptsrc",
    "pretrain": "demo/pretrain-student",
}

HOSTILE_VALUES = [
    "",
    "null",
    "~",
    "-1",
    "0",
    "1e309",
    "-1e309",
    ".inf",
    ".nan",
    "nan",
    "9" * 5000,
    "²",
    "١٢",
    "[1, 2",
    "{a: }",
    "{a: [}",
    "[[[[[[[[[[]]]]]]]]]]",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=",
    "&a [*a]",
    "*undefined",
    "'unterminated",
    "\x00",
    "\x1b[31mred",
    "a" * 10000,
    "../../etc/passwd",
    "/dev/zero",
    "true",
    "yes",
    "0x10",
    "1_000",
    "2025-01-01",
    "{}",
    "[]",
    "{source: nowhere}",
    "{weight: -5}",
    "ünïcödé",
]

JUNK_KEYS = [
    "",
    ".",
    "a..b",
    "²",
    "0",
    "objectives.0",
    "train.9999",
    "x" * 300,
    "data.source.x",
    "eval.².split",
]


def _key_paths(node: Any, prefix: str = "") -> list[str]:
    paths: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            paths.append(path)
            paths += _key_paths(value, path + ".")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            path = f"{prefix}{i}"
            paths.append(path)
            paths += _key_paths(value, path + ".")
    return paths


def _overrides(rng: random.Random, keys: list[str]) -> list[str]:
    out = []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(keys) if rng.random() < 0.8 else rng.choice(JUNK_KEYS)
        value = rng.choice(HOSTILE_VALUES)
        out.append(f"{key}={value}" if rng.random() < 0.95 else key + value)
    return out


@pytest.mark.parametrize("command", sorted(RECIPES))
def test_hostile_overrides_end_in_the_recipe_or_one_clear_error(command):
    keys = _key_paths(read_recipe_yaml(find_recipe(RECIPES[command])))
    rng = random.Random(f"fuzz-{command}")
    runner = CliRunner()
    failures = []
    for _ in range(120):
        overrides = _overrides(rng, keys)
        result = runner.invoke(main, [command, RECIPES[command], *overrides, "--dry-run"])
        clean = result.exit_code in (0, 2) and (
            result.exception is None or isinstance(result.exception, SystemExit)
        )
        if not clean or "Traceback" in result.output:
            failures.append((overrides, result.exit_code, repr(result.exception)[:300]))
        elif result.exit_code == 2:
            assert result.output.strip(), overrides  # an error that says something
    assert not failures, failures[:5]
