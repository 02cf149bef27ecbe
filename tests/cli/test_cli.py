"""The command line: help texts, recipe listing, dry runs and user errors without tracebacks."""

from __future__ import annotations

import pytest
import yaml

from kdprompt.cli import main

COMMANDS = sorted(main.commands)


def test_top_level_help_lists_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in ("pretrain", "shards", "recipes", "demo"):
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 4


def test_recipes_lists_and_shows(cli):
    listing = cli("recipes")
    assert listing.exit_code == 0
    assert "demo/pretrain-teacher" in listing.output and "pretrain" in listing.output
    shown = cli("recipes", "show", "demo/pretrain-teacher")
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.output)["model"]["name"] == "kd-tiny-teacher"


def test_dry_run_prints_resolved_recipe(cli):
    result = cli("pretrain", "demo/pretrain-student", "train.batch_size=9", "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["train"]["batch_size"] == 9
    assert resolved["resume"] == "auto"  # defaults are filled in


def test_bad_override_is_one_message_and_exit_2(cli):
    result = cli("pretrain", "demo/pretrain-student", "train.lr=fast", "--dry-run")
    assert result.exit_code == 2
    assert "train.lr" in result.output and "'fast'" in result.output
    assert "Traceback" not in result.output


def test_unknown_shards_source_is_reported(cli, tmp_path):
    result = cli("shards", "imagenette", tmp_path / "out")
    assert result.exit_code == 2
    assert "not a directory, a YAML file, or a source name" in result.output
