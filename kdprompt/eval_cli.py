"""``kdprompt eval``: base / novel / HM accuracy of zero-shot CLIPs and teachers on labelled data.

Kept apart from :mod:`kdprompt.cli` (which registers the command) so that neither imports the other
at module import time; what it needs from the CLI module is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kdprompt.cli_common import CONTEXT_SETTINGS, resolve_device, user_errors
from kdprompt.errors import KdpromptError

DEFAULT_OUT = Path("runs/eval")


def _data_dict(config: Any) -> dict[str, Any] | None:
    return None if config is None else config.model_dump(mode="json")


def parse_zero_shot(text: str) -> tuple[str, str | None]:
    """Split ``MODEL[@PRETRAINED]`` into the model name and its weights (``None`` when absent)."""
    name, _, pretrained = text.partition("@")
    if not name.strip():
        raise KdpromptError(
            f"--zero-shot {text!r}: give a model name, e.g. kd-tiny-teacher or "
            "ViT-B-32@cache/pretrained/vit-b-32.safetensors"
        )
    return name.strip(), (pretrained.strip() or None)


def _zero_shot_name(name: str, pretrained: str | None) -> str:
    """Report name: the model plus the weights' file name (or tag), so runs of one arch differ."""
    if not pretrained:
        return f"zero-shot {name}"
    return f"zero-shot {name}@{Path(pretrained).name}"


def _resolve_data(
    data_src: str | None, overrides: tuple[str, ...], trained_on: dict[str, Any] | None, origin: str
) -> Any:
    """The data config: from ``--data`` + overrides, else the one a model records (+ overrides)."""
    from kdprompt.cli import _data_config

    if data_src is not None:
        return _data_config(data_src, overrides)
    if trained_on is None:
        where = f" ({origin} does not record its data)" if origin else ""
        raise KdpromptError(
            f"give --data SRC{where}: a directory, a data YAML file, or a source name "
            "(folder, coop, shards, synthetic) with key=value overrides"
        )
    from kdprompt.config import DataSection, apply_overrides, validate_recipe

    raw = apply_overrides(dict(trained_on), list(overrides))
    return validate_recipe(DataSection, {"data": raw}, origin=f"the data config of {origin}").data


@click.command("eval", context_settings=CONTEXT_SETTINGS)
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
    type=click.Choice(["simple", "ensemble"]),
    default="simple",
    show_default=True,
    help="Zero-shot prompts: 'a photo of a {}.' or the 80 OpenAI ImageNet templates averaged.",
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
      a directory            class-per-subfolder images (the `folder` source)
      a YAML file            a data config (a recipe's `data:` section, or a recipe with one)
      folder|coop|shards|synthetic   a source name, configured with OVERRIDES
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
    import torch

    from kdprompt.data.sources import load_split
    from kdprompt.evaluate import ZeroShotClassifier, evaluate_base_novel, evaluation_table
    from kdprompt.io import write_json_atomic, write_text_atomic
    from kdprompt.models.loading import create_clip
    from kdprompt.models.spec import ModelSpec

    if not zero_shot and not teacher_dirs and not student_dirs and not bundle_dirs:
        raise KdpromptError(
            "no model to evaluate: give --zero-shot MODEL[@PRETRAINED], --teacher DIR, --student DIR "
            "and/or --bundle DIR (each repeatable)"
        )
    # Parse every model argument before any slow loading, so a typo fails at once.
    zero_shot_specs = [parse_zero_shot(z) for z in zero_shot]
    device = resolve_device(device)

    # Teachers are loaded one at a time (big models); only the first may be needed up front, for its data.
    first_teacher = None
    if teacher_dirs and data_src is None:
        from kdprompt.models.teacher import load_teacher

        first_teacher = load_teacher(Path(teacher_dirs[0]), device=device)
    if first_teacher is not None:
        trained_on, origin = _data_dict(first_teacher.data_config), f"teacher {teacher_dirs[0]}"
    elif bundle_dirs and data_src is None:
        from kdprompt.deploy.bundle import read_manifest

        trained_on = read_manifest(Path(bundle_dirs[0]))["teacher"].get("data")
        origin = f"the teacher of bundle {bundle_dirs[0]}"
    else:
        trained_on, origin = None, ""
    data_cfg = _resolve_data(data_src, overrides, trained_on, origin)
    data = load_split(data_cfg, split)
    click.echo(
        f"evaluating on {data_cfg.source} {split}: {len(data)} images, {len(data.classnames)} classes",
        err=True,
    )

    def loaders() -> Any:
        # Models are created one at a time so that only one is in memory at once.
        for name, pretrained in zero_shot_specs:
            clip = create_clip(ModelSpec(name=name, pretrained=pretrained), device=device)
            clf = ZeroShotClassifier(clip, templates=templates, name=_zero_shot_name(name, pretrained))
            info = {"kind": "zero-shot", "spec": clip.spec.model_dump(mode="json"), "templates": templates}
            yield clf, info
        nonlocal first_teacher
        for i, path in enumerate(teacher_dirs):
            if i == 0 and first_teacher is not None:
                teacher, first_teacher = first_teacher, None
            else:
                from kdprompt.models.teacher import load_teacher

                teacher = load_teacher(Path(path), device=device)
            yield teacher, {"kind": "teacher", "path": str(path)}
        for path in student_dirs:
            from kdprompt.models.student import StudentClassifier, load_student

            student, cache = load_student(Path(path), device=device)
            yield (
                StudentClassifier(student, cache, name=f"student {Path(path).resolve().parent.name}"),
                {
                    "kind": "student",
                    "path": str(path),
                },
            )
        for path in bundle_dirs:
            from kdprompt.deploy import load_bundle

            yield load_bundle(Path(path), device=device), {"kind": "bundle", "path": str(path)}

    data_info = {"data_source": data_cfg.source, "data": data_cfg.model_dump(mode="json")}
    results: list[dict[str, Any]] = []
    for clf, info in loaders():
        click.echo(f"  {clf.name} ...", err=True)
        result = evaluate_base_novel(clf, data, device=device, batch_size=batch_size)
        results.append({**result, "split": split, **info, **data_info})
        del clf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    table = evaluation_table(results)
    out = Path(out)
    write_json_atomic(out / "metrics.json", results)
    write_text_atomic(out / "metrics.md", table + "\n")
    click.echo(table)
    click.echo(f"metrics written to {out / 'metrics.json'} and {out / 'metrics.md'}", err=True)
