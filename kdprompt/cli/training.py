"""``kdprompt recipes``, ``pretrain``, ``teacher`` and ``distill``: resolve a recipe, run its loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from kdprompt.cli.options import CONTEXT_SETTINGS, echo_main, recipe_command, user_errors
from kdprompt.errors import KdpromptError


def training_loops() -> dict[str, Callable[[Any], Any]]:
    """The run function of each recipe kind (the one place naming the training loop modules)."""
    from kdprompt.train.clipkd_loop import run_clipkd
    from kdprompt.train.distill_loop import run_distill
    from kdprompt.train.pretrain_loop import run_pretrain
    from kdprompt.train.teacher_loop import run_teacher

    return {"pretrain": run_pretrain, "teacher": run_teacher, "distill": run_distill, "clipkd": run_clipkd}


def run_recipe(kind: str, recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Resolve a ``kind`` recipe, then print it (``--dry-run``) or run its training loop."""
    from kdprompt.config.loading import dump_recipe, load_recipe
    from kdprompt.config.recipes import RECIPE_MODELS

    resolved = load_recipe(RECIPE_MODELS[kind], recipe, overrides)
    if dry_run:
        click.echo(dump_recipe(resolved), nl=False)
        return
    echo_main(f"done: {training_loops()[kind](resolved)}")


# ------------------------------------------------------------------------------------------ recipes


@click.group(invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.pass_context
@user_errors
def recipes(ctx: click.Context) -> None:
    """List the built-in recipes (name, command, description)."""
    if ctx.invoked_subcommand is not None:
        return
    from kdprompt.config.loading import builtin_recipes, read_recipe_yaml, recipe_description

    known = builtin_recipes()
    if not known:
        raise KdpromptError(
            "no built-in recipes found; set KDPROMPT_RECIPES_DIR to kdprompt's recipes/ folder"
        )
    width = max(len(n) for n in known)
    for name, path in known.items():
        kind = read_recipe_yaml(path).get("recipe", "?")
        click.echo(f"{name:<{width}}  {kind:<9} {recipe_description(path)}")
    click.echo(
        "\nShow one with `kdprompt recipes show NAME`; run it with `kdprompt <command> NAME [key=value ...]`."
    )


@recipes.command("show", context_settings=CONTEXT_SETTINGS)
@click.argument("name")
@user_errors
def recipes_show(name: str) -> None:
    """Print the recipe NAME (a built-in name or a path) as written."""
    from kdprompt.config.loading import find_recipe

    click.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


# ------------------------------------------------------------------------------ training commands


@recipe_command
def pretrain(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Contrastive CLIP pre-training of any open_clip model on image-text data.

    RECIPE is a built-in name (see `kdprompt recipes`) or a YAML file; OVERRIDES are key.sub=value
    pairs, e.g. `train.max_steps=50 model.name=ViT-B-32`. Writes <output_dir>/<name>/pretrain/:
    model.safetensors (open_clip-loadable), metrics.jsonl, metrics.json, curves.png, checkpoints/.
    """
    run_recipe("pretrain", recipe, overrides, dry_run)


@recipe_command
def teacher(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Train a prompt-learned teacher (PromptSRC or MaPLe) on few-shot labelled base classes.

    RECIPE is a built-in name (see `kdprompt recipes`) or a YAML file; OVERRIDES are key.sub=value
    pairs, e.g. `method.name=maple fewshot.shots=4 seed=2`. Writes <output_dir>/<name>/teacher/
    (prompts.safetensors, teacher.json, metrics, checkpoints, curves.png, eval.md) and the text-feature
    cache of all the data's classes under cache/<name>/ (or `cache_dir`).
    """
    run_recipe("teacher", recipe, overrides, dry_run)


@recipe_command
def distill(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Distill a compact student from a teacher on unlabelled shards (kl, fd, icl_image, crd_image objectives).

    RECIPE is a built-in name (see `kdprompt recipes`) or a YAML file; OVERRIDES are key.sub=value
    pairs, e.g. `student.adaptation=prompts objectives.kl.weight=1000`. The teacher's image features
    are computed per batch, its class text features come from its cache (never re-encoded). Writes
    <output_dir>/<name>/student/ (student.safetensors, student.json, metrics, checkpoints, curves.png).
    """
    run_recipe("distill", recipe, overrides, dry_run)
