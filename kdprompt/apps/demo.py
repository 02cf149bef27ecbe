"""``kdprompt demo``: the pipeline on the embedded default (the synthetic world, tiny CLIPs), offline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from kdprompt.config.distill import DistillRecipe
from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.config.loading import dump_recipe, load_recipe
from kdprompt.config.pretrain import PretrainRecipe
from kdprompt.config.teacher import TeacherRecipe
from kdprompt.evaluate import markdown_table
from kdprompt.io import atomic_write, write_json_atomic, write_text_atomic

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
QUICK_DISTILL_OVERRIDES = ["data.train_per_class=4", "data.test_per_class=4", "train.epochs=1"]
QUICK_TEACHER_OVERRIDES = [
    "data.train_per_class=4",
    "data.test_per_class=4",
    "fewshot.shots=4",
    "train.epochs=2",
]


def pretrained_or_train(recipe: PretrainRecipe) -> dict:
    """Reuse the exported weights when their provenance matches ``recipe``, else pre-train now."""
    from kdprompt.train.pretrain_loop import run_dir_of, run_pretrain

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
    from kdprompt.train.teacher_loop import run_dir_of, run_teacher

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


@torch.no_grad()
def images_per_second(
    encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 128
) -> float:
    """Inference throughput of an image encoder on CPU tensors (one warm-up batch, then timed)."""
    encode(images[:batch])
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        encode(images[i : i + batch])
    return len(images) / max(time.perf_counter() - start, 1e-9)


def _student_stage(out: Path, cache_dir: Path, quick: bool, demo_dir: Path, weights: Path) -> list[dict]:
    """Distill the compact student from the PromptSRC teacher; the final comparison rows."""
    from kdprompt.data.dataset import SplitDataset
    from kdprompt.data.sources import load_split
    from kdprompt.evaluate import ZeroShotClassifier, evaluate_base_novel
    from kdprompt.models.loading import create_clip
    from kdprompt.models.student import StudentClassifier, count_parameters, load_student
    from kdprompt.models.teacher import load_teacher
    from kdprompt.train.distill_loop import run_dir_of, run_distill

    teacher_name = f"demo{'-quick' if quick else ''}-teacher-promptsrc"
    overrides = [
        f"output_dir={out}",
        f"teacher={out / teacher_name / 'teacher'}",
        f"cache={cache_dir / teacher_name}",
        f"student.model.pretrained={weights}",
        f"data.root={cache_dir / 'synthetic'}",
        f"shards_dir={cache_dir / 'shards'}",
    ]
    if quick:
        overrides += ["name=demo-quick-distill-student", *QUICK_DISTILL_OVERRIDES]
    recipe = load_recipe(DistillRecipe, "demo/distill-student", overrides)
    click.echo("\n== distill the compact student on unlabelled shards of all classes")
    run_distill(recipe)
    write_text_atomic(demo_dir / "distill-student.yaml", dump_recipe(recipe))

    teacher = load_teacher(recipe.teacher)
    student, cache = load_student(run_dir_of(recipe))
    zero_shot_student = ZeroShotClassifier(create_clip(recipe.student.model), name="zero-shot student")
    zero_shot_teacher = ZeroShotClassifier(create_clip(teacher.spec), name="zero-shot teacher")
    test = load_split(teacher.data_config, "test")
    images = torch.stack([SplitDataset(test, teacher.transform)[i][0] for i in range(min(len(test), 512))])
    models = [
        ("zero-shot teacher", zero_shot_teacher, count_parameters(teacher.clip_model.visual)),
        ("promptsrc teacher", teacher, count_parameters(teacher.clip_model.visual)),
        ("zero-shot student", zero_shot_student, student.image_tower_parameters()),
        ("distilled student", StudentClassifier(student, cache), student.image_tower_parameters()),
        ("student bundle", *_export_bundle(run_dir_of(recipe), demo_dir / "bundle")),
    ]
    rows = []
    for label, clf, params in models:
        row = evaluate_base_novel(clf, test)
        row.update(
            model=label, image_tower_params=params, images_per_s=images_per_second(clf.encode_images, images)
        )
        rows.append(row)
    return rows


def _export_bundle(student_run: Path, out: Path) -> tuple[object, int]:
    """Ship the distilled student as a bundle (with ONNX when the onnx extra is installed); load it back."""
    import importlib.util

    from kdprompt.deploy import export_bundle, load_bundle

    onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
    click.echo(f"\n== export the student as a deployable bundle: {out}")
    manifest = export_bundle(student_run, out, onnx=onnx, overwrite=True)
    return load_bundle(out), manifest["parameters"]["image_tower"]


def _bar_chart(rows: list[dict], png: Path) -> None:
    """Base / novel / HM bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["base", "novel", "hm"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [k + i * width for k in range(len(keys))]
        ax.bar(xs, [row[k] for k in keys], width, label=row["model"])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], ["base", "novel", "HM"])
    ax.set_ylabel("top-1 (%)")
    ax.set_title("synthetic world, downstream test split")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def run_demo(out: Path, cache_dir: Path, quick: bool = False) -> Path:
    """Run the demo pipeline and print its summary tables; returns the demo directory."""
    demo_dir = Path(out) / ("demo-quick" if quick else "demo")
    pretrain_rows, exports = _pretrain_stage(out, cache_dir, quick, demo_dir)
    teacher_rows = _teacher_stage(out, cache_dir, quick, demo_dir, exports["teacher"])
    final_rows = _student_stage(out, cache_dir, quick, demo_dir, exports["student"])
    pretrain_table = markdown_table(
        pretrain_rows, ["model", "pretrain domain", "downstream", "pretrain steps"]
    )
    teacher_table = markdown_table(teacher_rows, ["model", "base", "novel", "hm", "all"])
    final_table = markdown_table(
        final_rows, ["model", "base", "novel", "hm", "image_tower_params", "images_per_s"]
    )
    text = (
        "## Zero-shot top-1 (%) of the pre-trained tiny CLIPs (test splits)\n\n"
        f"{pretrain_table}\n\n"
        "## Teachers: base-to-novel top-1 (%) on the downstream test split\n\n"
        f"{teacher_table}\n\n"
        "## Teacher vs distilled student (downstream test split; image-encoder images/s on this machine)\n\n"
        f"{final_table}\n"
    )
    write_text_atomic(demo_dir / "summary.md", text)
    write_json_atomic(
        demo_dir / "summary.json",
        {"pretrain": pretrain_rows, "base_to_novel": teacher_rows, "final": final_rows},
    )
    _bar_chart(final_rows, demo_dir / "summary.png")
    click.echo("\n" + text)
    click.echo(f"written: {demo_dir / 'summary.md'} (+ summary.json, summary.png)")
    click.echo(
        f"next: kdprompt predict {demo_dir / 'bundle'} IMAGE_OR_DIR... | kdprompt serve {demo_dir / 'bundle'}"
    )
    return demo_dir
