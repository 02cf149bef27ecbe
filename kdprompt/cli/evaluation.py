"""``kdprompt eval``: base / novel / HM accuracy of zero-shot CLIPs, teachers, students and bundles."""

from __future__ import annotations

from pathlib import Path

import click

from kdprompt.cli.options import CONTEXT_SETTINGS, SourcesHelpCommand, resolve_device, user_errors

DEFAULT_OUT = Path("runs/eval")
# kdprompt.models.templates.TEMPLATE_SET_NAMES, spelled out so that `--help` does not import torch.
TEMPLATE_CHOICES = ("simple", "ensemble", "promptsrc", "coop")


@click.command("eval", cls=SourcesHelpCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("overrides", nargs=-1)
@click.option(
    "--zero-shot",
    "zero_shot",
    multiple=True,
    metavar="MODEL[@PRETRAINED]",
    help="A plain CLIP classifying by prompted class names; repeat for several.",
)
@click.option(
    "--teacher",
    "teacher_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="A teacher directory (runs/<name>/teacher); repeat for several.",
)
@click.option(
    "--student",
    "student_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="A distilled student (runs/<name>/student), classifying with its cached text features; repeatable.",
)
@click.option(
    "--bundle",
    "bundle_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="A bundle from `kdprompt export`; repeatable.",
)
@click.option(
    "--data",
    "data_src",
    metavar="SRC",
    default=None,
    help="Labelled data: a directory, a data YAML file or a source name (default: the first teacher's data).",
)
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default="test",
    show_default=True,
    help="Split to evaluate on.",
)
@click.option(
    "--templates",
    type=click.Choice(TEMPLATE_CHOICES),
    default="simple",
    show_default=True,
    help="Zero-shot prompts: 'a photo of a {}.', open_clip's 80 ImageNet templates, PromptSRC's 60, "
    "or CoOp's template of the --data dataset (coop data only).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OUT,
    show_default=True,
    help="Directory for metrics.json and metrics.md.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch."
)
@click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto (cuda when available)."
)
@user_errors
def eval_command(
    overrides: tuple[str, ...],
    zero_shot: tuple[str, ...],
    teacher_dirs: tuple[Path, ...],
    student_dirs: tuple[Path, ...],
    bundle_dirs: tuple[Path, ...],
    data_src: str | None,
    split: str,
    templates: str,
    out: Path,
    batch_size: int,
    device: str,
) -> None:
    """Base / novel / all accuracy and their harmonic mean (HM) of one or more models.

    Base classes are the first ceil(n/2) of the data's n classes in label order, novel the rest (CoOp's
    base-to-novel protocol): base images are classified among base classes, novel images among
    novel classes, and all images among all classes.

    \b
    Models (at least one, each option repeatable):
      --zero-shot MODEL[@PRETRAINED]  an open_clip model (built-in, kdprompt config or JSON path),
                                      weights after '@' (a local file or an open_clip tag)
      --teacher DIR                   a trained teacher (runs/<name>/teacher)
      --student DIR                   a distilled student (runs/<name>/student), with its cached text features
      --bundle DIR                    a bundle from `kdprompt export` (same accuracies as its student)

    \b
    Data: --data SRC plus OVERRIDES (key=value), where SRC is
      a directory     class-per-subfolder images (the `folder` source)
      a YAML file     a data config (a recipe's `data:` section, or a recipe with one)
      a source name   {sources}, configured with OVERRIDES
    Without --data, the first teacher's own data is used, else the data of the first bundle's teacher
    (OVERRIDES still apply).

    \b
    Examples:
      kdprompt eval --zero-shot kd-tiny-teacher@cache/pretrained/kd-tiny-teacher.safetensors \\
          --data synthetic domain=downstream
      kdprompt eval --teacher runs/dtd/teacher --zero-shot ViT-B-16@openai
      kdprompt eval --teacher runs/dtd/teacher --student runs/dtd-kd/student
      kdprompt eval --bundle runs/dtd-kd/bundle --student runs/dtd-kd/student
      kdprompt eval --teacher runs/dtd/teacher --data coop root=~/data dataset=dtd --split val

    Prints a Markdown table and writes OUT/metrics.json (one entry per model, with image and class
    counts) and OUT/metrics.md.
    """
    from kdprompt.classifiers import evaluate_classifiers, load_classifiers, write_evaluation

    device = resolve_device(device)
    classifiers, data_cfg = load_classifiers(
        zero_shot=zero_shot,
        teachers=teacher_dirs,
        students=student_dirs,
        bundles=bundle_dirs,
        templates=templates,
        data_src=data_src,
        overrides=overrides,
        device=device,
    )
    data = data_cfg.load_split(split)
    click.echo(
        f"evaluating on {data_cfg.source} {split}: {len(data)} images, {len(data.classnames)} classes",
        err=True,
    )
    results = evaluate_classifiers(
        classifiers,
        data,
        split=split,
        data_config=data_cfg,
        batch_size=batch_size,
        on_model=lambda name: click.echo(f"  {name} ...", err=True),
    )
    table = write_evaluation(out, results)
    click.echo(table)
    click.echo(f"metrics written to {out / 'metrics.json'} and {out / 'metrics.md'}", err=True)
