"""``kdprompt demo``: the pipeline on the embedded default (the synthetic world, tiny CLIPs), offline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdprompt.config import PretrainRecipe, TeacherRecipe, dump_recipe, load_recipe, recipe_fingerprint
from kdprompt.evaluate import markdown_table
from kdprompt.io import write_json_atomic, write_text_atomic

DEMO_PRETRAIN = {"teacher": "demo/pretrain-teacher", "student": "demo/pretrain-student"}
DEMO_TEACHERS = ("promptsrc", "maple")
QUICK_OVERRIDES = [
    "train.max_steps=20",
    "data.train_per_class=16",
    "data.test_per_class=4",
    "eval.0.data.train_per_class=16",
    "eval.0.data.test_per_class=4",
    "eval.1.data.train_per_class=4",
    "eval.1.data.test_per_class=4",
]
QUICK_TEACHER_OVERRIDES = [
    "data.train_per_class=4",
    "data.test_per_class=4",
    "fewshot.shots=4",
    "train.epochs=2",
]


def pretrained_or_train(recipe: PretrainRecipe) -> dict:
    """Reuse the exported weights when their provenance matches ``recipe``, else pre-train now."""
    from kdprompt.train.pretrain import run_dir_of, run_pretrain

    assert recipe.export is not None
    provenance = recipe.export.with_suffix(".json")
    digest = recipe_fingerprint(recipe)
    if recipe.export.is_file() and provenance.is_file():
        info = json.loads(provenance.read_text(encoding="utf-8"))
        if info.get("recipe_digest") == digest:
            click.echo(f"reusing {recipe.export} (pre-trained with the same recipe)")
            return info["metrics"]
    run_dir = run_pretrain(recipe)
    metrics = json.loads((run_dir_of(recipe) / "metrics.json").read_text(encoding="utf-8"))
    write_json_atomic(
        provenance,
        {
            "recipe_digest": digest,
            "run_dir": str(run_dir),
            "metrics": metrics,
            "recipe": json.loads(json.dumps(recipe.model_dump(mode="json"))),
        },
    )
    return metrics


def _pretrain_stage(
    out: Path, cache_dir: Path, quick: bool, demo_dir: Path
) -> tuple[list[dict], dict[str, Path]]:
    """Pre-train (or reuse) the tiny teacher-size and student-size CLIPs; rows of their zero-shot accuracy."""
    rows, exports = [], {}
    suffix = "-quick" if quick else ""
    for role, name in DEMO_PRETRAIN.items():
        overrides = [
            f"output_dir={out}",
            f"data.root={cache_dir / 'synthetic'}",
            f"shards_dir={cache_dir / 'shards'}",
            f"export={cache_dir / 'pretrained' / f'kd-tiny-{role}-synthetic{suffix}.safetensors'}",
            *[f"eval.{i}.data.root={cache_dir / 'synthetic'}" for i in range(2)],
        ]
        if quick:
            overrides += [*QUICK_OVERRIDES, f"name=demo-quick-pretrain-{role}"]
        recipe = load_recipe(PretrainRecipe, name, overrides)
        click.echo(f"\n== pre-train the tiny {role}-size CLIP ({recipe.model.name})")
        metrics = pretrained_or_train(recipe)
        zs = metrics.get("zero_shot_top1", {})
        rows.append(
            {
                "model": f"zero-shot {role} ({recipe.model.name})",
                "pretrain domain": zs.get("pretrain_test"),
                "downstream": zs.get("downstream_test"),
                "pretrain steps": metrics.get("steps"),
            }
        )
        exports[role] = recipe.export
        write_text_atomic(demo_dir / f"pretrain-{role}.yaml", dump_recipe(recipe))
    return rows, exports


def _teacher_stage(out: Path, cache_dir: Path, quick: bool, demo_dir: Path, weights: Path) -> list[dict]:
    """Train the PromptSRC and MaPLe demo teachers; rows of base / novel / HM on the downstream test split."""
    from kdprompt.train.teacher import run_dir_of, run_teacher

    rows: list[dict] = []
    for method in DEMO_TEACHERS:
        name = f"demo{'-quick' if quick else ''}-teacher-{method}"
        overrides = [
            f"name={name}",
            f"output_dir={out}",
            f"data.root={cache_dir / 'synthetic'}",
            f"model.pretrained={weights}",
            f"cache_dir={cache_dir / name}",
        ]
        if quick:
            overrides += QUICK_TEACHER_OVERRIDES
        recipe = load_recipe(TeacherRecipe, f"demo/teacher-{method}", overrides)
        click.echo(f"\n== train the {method} teacher on 16-shot base classes")
        run_teacher(recipe)
        evals = json.loads((run_dir_of(recipe) / "metrics.json").read_text(encoding="utf-8"))["eval"]
        if not rows:
            rows.append({**evals[0], "model": f"zero-shot teacher ({recipe.model.name})"})
        rows.append({**evals[1], "model": f"{method} teacher"})
        write_text_atomic(demo_dir / f"teacher-{method}.yaml", dump_recipe(recipe))
    return rows


def run_demo(out: Path, cache_dir: Path, quick: bool = False) -> Path:
    """Run the demo pipeline and print its summary tables; returns the demo directory."""
    demo_dir = Path(out) / ("demo-quick" if quick else "demo")
    pretrain_rows, exports = _pretrain_stage(out, cache_dir, quick, demo_dir)
    teacher_rows = _teacher_stage(out, cache_dir, quick, demo_dir, exports["teacher"])
    pretrain_table = markdown_table(
        pretrain_rows, ["model", "pretrain domain", "downstream", "pretrain steps"]
    )
    teacher_table = markdown_table(teacher_rows, ["model", "base", "novel", "hm", "all"])
    text = (
        "## Zero-shot top-1 (%) of the pre-trained tiny CLIPs (test splits)\n\n"
        f"{pretrain_table}\n\n"
        "## Base-to-novel top-1 (%) on the downstream test split\n\n"
        f"{teacher_table}\n"
    )
    write_text_atomic(demo_dir / "summary.md", text)
    write_json_atomic(demo_dir / "summary.json", {"pretrain": pretrain_rows, "base_to_novel": teacher_rows})
    click.echo("\n" + text)
    click.echo(f"written: {demo_dir / 'summary.md'}")
    return demo_dir
