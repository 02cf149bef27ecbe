"""The ``kdprompt`` command line: each command parses, validates a recipe, and calls one function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kdprompt import __version__
from kdprompt.cli_common import CONTEXT_SETTINGS, echo_main, user_errors
from kdprompt.errors import KdpromptError

OVERRIDES_HELP = "Recipe overrides as key.sub=value (YAML values), applied after the recipe file."


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="kdprompt")
def main() -> None:
    """kdprompt: distill compact CLIP students from prompt-learned teachers.

    \b
    Pipeline:
      kdprompt pretrain RECIPE   contrastive CLIP pre-training on image-text shards
      kdprompt teacher RECIPE    prompt-learn a teacher (PromptSRC / MaPLe), cache its class features
      kdprompt cache TEACHER     text-feature cache for another class list, no retraining
      kdprompt distill RECIPE    distill a compact student on unlabelled shards
      kdprompt eval ...          base / novel / HM accuracy of zero-shot CLIPs, teachers, students, bundles
      kdprompt export RUN OUT    ship a distilled student as a bundle (safetensors, cache, optional ONNX)
      kdprompt predict BUNDLE X  classify images with a bundle (table or JSON lines)
      kdprompt serve BUNDLE      HTTP JSON API for a bundle (pip install 'kdprompt[serve]')
      kdprompt shards SRC OUT    write any data source's split as webdataset shards
      kdprompt demo              the pipeline on the built-in synthetic world, offline

    Every training command takes a RECIPE (a built-in name from `kdprompt recipes`, or a YAML file)
    followed by key.sub=value overrides, and runs unchanged under `accelerate launch -m kdprompt ...`.
    """


# ------------------------------------------------------------------------------------------ recipes


@main.group(invoke_without_command=True)
@click.pass_context
@user_errors
def recipes(ctx: click.Context) -> None:
    """List the built-in recipes (name, command, description)."""
    if ctx.invoked_subcommand is not None:
        return
    from kdprompt.config import builtin_recipes, read_recipe_yaml, recipe_description

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


@recipes.command("show")
@click.argument("name")
@user_errors
def recipes_show(name: str) -> None:
    """Print the recipe NAME (a built-in name or a path) as written."""
    from kdprompt.config import find_recipe

    click.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


# ------------------------------------------------------------------------------ training commands


def _run_recipe(kind: str, recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Resolve a ``kind`` recipe, then print it (``--dry-run``) or run its training loop."""
    import importlib

    from kdprompt.config import RECIPE_MODELS, dump_recipe, load_recipe

    resolved = load_recipe(RECIPE_MODELS[kind], recipe, overrides)
    if dry_run:
        click.echo(dump_recipe(resolved), nl=False)
        return
    run = getattr(importlib.import_module(f"kdprompt.train.{kind}"), f"run_{kind}")
    echo_main(f"done: {run(resolved)}")


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@user_errors
def pretrain(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Contrastive CLIP pre-training of any open_clip model on image-text data.

    RECIPE is a built-in name (see `kdprompt recipes`) or a YAML file; OVERRIDES are key.sub=value
    pairs, e.g. `train.max_steps=50 model.name=ViT-B-32`. Writes <output_dir>/<name>/pretrain/:
    model.safetensors (open_clip-loadable), metrics.jsonl, metrics.json, curves.png, checkpoints/.
    """
    _run_recipe("pretrain", recipe, overrides, dry_run)


# ------------------------------------------------------------------------------------------ teacher


@main.command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@user_errors
def teacher(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Train a prompt-learned teacher (PromptSRC or MaPLe) on few-shot labelled base classes.

    RECIPE is a built-in name (see `kdprompt recipes`) or a YAML file; OVERRIDES are key.sub=value
    pairs, e.g. `method.name=maple fewshot.shots=4 seed=2`. Writes <output_dir>/<name>/teacher/
    (prompts.safetensors, teacher.json, metrics, checkpoints, curves.png, eval.md) and the text-feature
    cache of all the data's classes under cache/<name>/ (or `cache_dir`).
    """
    _run_recipe("teacher", recipe, overrides, dry_run)


# ------------------------------------------------------------------------------------------ distill


@main.command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@user_errors
def distill(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Distill a compact student from a teacher on unlabelled shards (kl, fd, icl, crd objectives).

    RECIPE is a built-in name (see `kdprompt recipes`) or a YAML file; OVERRIDES are key.sub=value
    pairs, e.g. `student.adaptation=prompts objectives.kl.weight=1000`. The teacher's image features
    are computed per batch, its class text features come from its cache (never re-encoded). Writes
    <output_dir>/<name>/student/ (student.safetensors, student.json, metrics, checkpoints, curves.png).
    """
    _run_recipe("distill", recipe, overrides, dry_run)


# -------------------------------------------------------------------------------------------- bench


@main.group()
def bench() -> None:
    """Benchmarks that print figures (images/s), for the notes of a change."""


@bench.command("distill")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Timed steps per loop.")
@user_errors
def bench_distill_command(recipe: str, overrides: tuple[str, ...], steps: int) -> None:
    """Distill-step throughput: cached teacher text features vs re-encoding them every batch.

    RECIPE is a distill recipe (its teacher, cache, student and data); the second loop re-encodes the
    teacher's class texts per batch as the PromptKD reference does. Prints images/s and the ratio.
    """
    import json

    from kdprompt.bench import bench_distill
    from kdprompt.config import DistillRecipe, load_recipe

    figures = bench_distill(load_recipe(DistillRecipe, recipe, overrides), steps=steps)
    click.echo(json.dumps(figures, indent=2))


@bench.command("predict")
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--teacher",
    "teacher_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Teacher to compare with (default: the one the bundle's manifest names).",
)
@click.option(
    "--images", type=click.IntRange(1), default=512, show_default=True, help="Images classified per pass."
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per batch.")
@click.option(
    "--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed passes (best kept)."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def bench_predict_command(
    bundle_dir: Path, teacher_dir: Path | None, images: int, batch_size: int, repeats: int, device: str
) -> None:
    """Classification images/s of a BUNDLE vs its teacher on the same images, and their sizes.

    Both classify the same preprocessed images (the teacher's test split when it records its data)
    to top-5; the teacher's class features are computed once, before timing. Prints JSON: images/s of
    the bundle (torch, and ONNX when exported), of the teacher, their ratio, parameters and bundle bytes.
    """
    import json

    from kdprompt.bench import bench_predict
    from kdprompt.cli_common import resolve_device

    figures = bench_predict(
        bundle_dir,
        teacher_dir,
        images=images,
        batch_size=batch_size,
        repeats=repeats,
        device=resolve_device(device),
    )
    click.echo(json.dumps(figures, indent=2))


# -------------------------------------------------------------------------------------------- cache


@main.command()
@click.argument("teacher_dir", metavar="TEACHER", type=click.Path(path_type=Path))
@click.option(
    "--classes",
    "classes_file",
    required=True,
    type=click.Path(path_type=Path),
    help="Class names: a text file (one per line) or a JSON list.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache directory to write (default: cache/<teacher run name>-<classes file stem>).",
)
@click.option("--device", default="cpu", show_default=True, help="Device to encode the class names on.")
@user_errors
def cache(teacher_dir: Path, classes_file: Path, out: Path | None, device: str) -> None:
    """Build a text-feature cache for any class list from a trained TEACHER, without retraining.

    TEACHER is a teacher directory (runs/<name>/teacher). The cache holds the teacher's prompted class
    text features (text_features.safetensors), a FAISS index and a manifest with the teacher's
    fingerprint; students and bundles classify with it alone.
    """
    import torch

    from kdprompt.cache import build_cache, read_classnames_file
    from kdprompt.models.teacher import load_teacher

    classnames = read_classnames_file(classes_file)
    model = load_teacher(teacher_dir, device=device)
    with torch.no_grad():
        features = model.class_features(classnames).float().cpu()
    out = out or Path("cache") / f"{Path(teacher_dir).resolve().parent.name}-{classes_file.stem}"
    build_cache(
        features,
        classnames,
        out,
        teacher_fingerprint=model.fingerprint,
        logit_scale=float(model.logit_scale),
        provenance={"teacher": str(teacher_dir), "classes_file": str(classes_file)},
    )
    click.echo(f"cache of {len(classnames)} classes written to {out}")


# ------------------------------------------------------------------------------------------- shards


@main.command()
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option(
    "--split",
    "splits",
    multiple=True,
    default=("train",),
    show_default=True,
    help="Split(s) to write (train, val, test); repeat for several.",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["jpg", "png"]),
    default="jpg",
    show_default=True,
    help="Image encoding inside the shards.",
)
@click.option("--maxcount", type=int, default=1000, show_default=True, help="Samples per shard.")
@click.option("--overwrite", is_flag=True, help="Replace existing shards of the same split in OUT.")
@user_errors
def shards(
    src: str,
    out: Path,
    overrides: tuple[str, ...],
    splits: tuple[str, ...],
    image_format: str,
    maxcount: int,
    overwrite: bool,
) -> None:
    """Write a data source's split(s) as webdataset shards plus sizes.json and classnames.json.

    \b
    SRC is one of:
      a directory            class-per-subfolder images (the `folder` source)
      a YAML file            a data config (the keys of a recipe's `data:` section, or a recipe with one)
      folder|coop|shards|synthetic   a source name, configured with OVERRIDES

    \b
    Examples:
      kdprompt shards ~/photos shards/photos
      kdprompt shards coop shards/dtd root=~/data dataset=dtd --split train --split test
      kdprompt shards synthetic shards/pre domain=pretrain
    """
    from kdprompt.data.shards import write_shards
    from kdprompt.data.sources import load_split

    cfg = _data_config(src, overrides)
    for split in splits:
        data = load_split(cfg, split)
        sizes = write_shards(
            data,
            out,
            prefix=split,
            image_format=image_format,
            maxcount=maxcount,
            overwrite=overwrite,
            progress=True,
        )
        click.echo(f"{split}: {sum(sizes.values())} samples in {len(sizes)} shard(s) under {out}")


def _data_config(src: str, overrides: tuple[str, ...]) -> Any:
    """A validated data config from a directory, a YAML file or a source name plus overrides."""
    from kdprompt.config import DataSection, apply_overrides, read_recipe_yaml, validate_recipe

    path = Path(src)
    if path.is_dir():
        raw: dict[str, Any] = {"source": "folder", "root": str(path)}
    elif path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise KdpromptError(f"data config file not found: {path}")
        raw = read_recipe_yaml(path)
        raw = raw.get("data", raw)
    elif src in ("folder", "coop", "shards", "synthetic"):
        raw = {"source": src}
    else:
        raise KdpromptError(
            f"SRC {src!r} is not a directory, a YAML file, or a source name (folder, coop, shards, synthetic)"
        )
    raw = apply_overrides(raw, list(overrides))
    return validate_recipe(DataSection, {"data": raw}, origin=f"data config {src}").data


# --------------------------------------------------------------------------------------------- demo


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Where run directories go.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cache"),
    show_default=True,
    help="Where the synthetic world, shards and pre-trained tiny CLIPs are kept.",
)
@click.option("--quick", is_flag=True, help="A much shorter run (smoke test), not for the reported figures.")
@user_errors
def demo(out: Path, cache_dir: Path, quick: bool) -> None:
    """Run the pipeline on the embedded default (synthetic world, tiny CLIPs), offline.

    Materialises the synthetic world, pre-trains the tiny teacher-size and student-size CLIPs (reused
    from the cache dir when already there), trains the PromptSRC and MaPLe teachers on 16-shot base
    classes (caching their class text features), and prints zero-shot and base / novel / HM tables.
    """
    from kdprompt.demo import run_demo

    run_demo(out=out, cache_dir=cache_dir, quick=quick)


def _register_commands() -> None:
    """Commands kept in their own modules (they import nothing from this one at import time)."""
    from kdprompt.bundle_cli import export_command, predict_command
    from kdprompt.eval_cli import eval_command
    from kdprompt.serve_cli import bench_serve_command, serve_command

    main.add_command(eval_command, "eval")
    main.add_command(export_command, "export")
    main.add_command(predict_command, "predict")
    main.add_command(serve_command, "serve")
    bench.add_command(bench_serve_command, "serve")


_register_commands()

if __name__ == "__main__":
    main()
