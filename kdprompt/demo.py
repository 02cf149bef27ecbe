"""``kdprompt demo``: the pipeline on the embedded default (the synthetic world, tiny CLIPs), offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click

from kdprompt.config import PretrainRecipe, dump_recipe, load_recipe
from kdprompt.evaluate import markdown_table
from kdprompt.io import write_json_atomic, write_text_atomic

DEMO_PRETRAIN = {"teacher": "demo/pretrain-teacher", "student": "demo/pretrain-student"}
QUICK_OVERRIDES = [
    "train.max_steps=20",
    "data.train_per_class=16",
    "data.test_per_class=4",
    "eval.0.data.train_per_class=16",
    "eval.0.data.test_per_class=4",
    "eval.1.data.train_per_class=4",
    "eval.1.data.test_per_class=4",
]


def recipe_digest(recipe: PretrainRecipe) -> str:
    """A digest of everything that determines a pre-trained model (not where it is written)."""
    data = recipe.model_dump(mode="json")
    for volatile in ("output_dir", "export", "resume", "eval", "description"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_or_train(recipe: PretrainRecipe) -> dict:
    """Reuse the exported weights when their provenance matches ``recipe``, else pre-train now."""
    from kdprompt.train.pretrain import run_dir_of, run_pretrain

    assert recipe.export is not None
    provenance = recipe.export.with_suffix(".json")
    digest = recipe_digest(recipe)
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


def run_demo(out: Path, cache_dir: Path, quick: bool = False) -> Path:
    """Run the demo pipeline and print its summary table; returns the demo directory."""
    demo_dir = Path(out) / ("demo-quick" if quick else "demo")
    rows = []
    suffix = "-quick" if quick else ""
    for role, name in DEMO_PRETRAIN.items():
        overrides = [
            f"output_dir={out}",
            f"data.root={cache_dir / 'synthetic'}",
            f"shards_dir={cache_dir / 'shards'}",
            f"export={cache_dir / 'pretrained' / f'kd-tiny-{role}-synthetic{suffix}.safetensors'}",
        ]
        for i in range(2):
            overrides.append(f"eval.{i}.data.root={cache_dir / 'synthetic'}")
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
        write_text_atomic(demo_dir / f"pretrain-{role}.yaml", dump_recipe(recipe))
    table = markdown_table(rows, ["model", "pretrain domain", "downstream", "pretrain steps"])
    write_text_atomic(demo_dir / "summary.md", table + "\n")
    write_json_atomic(demo_dir / "summary.json", rows)
    click.echo("\nzero-shot top-1 (%) on the synthetic world's test splits\n")
    click.echo(table)
    click.echo(f"\nwritten: {demo_dir / 'summary.md'}")
    return demo_dir
