"""CLIP-KD on the synthetic world: teacher vs the student pre-trained from scratch vs distilled students.

The pre-trained kd-tiny-teacher is distilled into kd-tiny-student on the captioned pre-training domain
with the same data, schedule and step budget as the student's own pre-training from scratch
(``demo/clipkd-student`` mirrors ``demo/pretrain-student``), plus an ablation of CLIP-KD's objectives.
Zero-shot top-1 on both synthetic domains for every model goes to ``OUT/clipkd_bench.{json,md}``.

    python -m kdprompt.apps.clipkd_bench [OUT] [key=value ...]     # overrides apply to every run

CPU-sized but long (seven trainings); reuses the pre-trained teacher and scratch student when their
exports exist.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kdprompt.io import write_json_atomic, write_text_atomic

ABLATION: dict[str, dict[str, Any]] = {
    "task only": {"task": {}},
    "+FD": {"task": {}, "fd": {}},
    "+ICL": {"task": {}, "icl": {}},
    "+CRD": {"task": {}, "crd": {}},
    "all (CLIP-KD)": {"task": {}, "fd": {}, "icl": {}, "crd": {}},
}


def _objectives_override(objectives: dict[str, dict]) -> str:
    return "objectives={" + ", ".join(f"{name}: {{}}" for name in objectives) + "}"


def _pretrained(recipe_name: str, overrides: list[str]) -> Path:
    """The export of a demo pretrain recipe, trained first when missing."""
    from kdprompt.config.loading import load_recipe
    from kdprompt.config.pretrain import PretrainRecipe
    from kdprompt.train.pretrain_loop import run_pretrain

    recipe = load_recipe(PretrainRecipe, recipe_name, overrides)
    assert recipe.export is not None
    if not Path(recipe.export).is_file():
        run_pretrain(recipe)
    return Path(recipe.export)


def clipkd_benchmark(out: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Train what is missing, distil every ablation, evaluate zero-shot; returns model -> eval -> top-1 (%).

    Args:
        out: where ``clipkd_bench.json`` and ``clipkd_bench.md`` go.
        overrides: ``key=value`` overrides applied to the pretrain and clipkd recipes alike (e.g. a
            smaller ``train.max_steps`` or ``data.root``).
    """
    import torch

    from kdprompt.config.clipkd import ClipKDRecipe
    from kdprompt.config.loading import load_recipe
    from kdprompt.models import ModelSpec, create_clip
    from kdprompt.train.clipkd_loop import run_clipkd
    from kdprompt.train.pretrain_loop import evaluate_zero_shot

    overrides = list(overrides)
    teacher = _pretrained("demo/pretrain-teacher", overrides)
    scratch = _pretrained("demo/pretrain-student", overrides)
    base = load_recipe(ClipKDRecipe, "demo/clipkd-student", [*overrides, f"teacher.pretrained={teacher}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def zero_shot(name: str, weights: Path) -> dict[str, float]:
        clip = create_clip(ModelSpec(name=name, pretrained=str(weights)), device=device)
        return evaluate_zero_shot(clip, base.eval, device)

    results = {
        "teacher (kd-tiny-teacher, pre-trained)": zero_shot("kd-tiny-teacher", teacher),
        "student from scratch (pretrain)": zero_shot("kd-tiny-student", scratch),
    }
    for label, objectives in ABLATION.items():
        slug = "-".join("".join(c if c.isalnum() else " " for c in label.lower()).split())
        run_overrides = [
            *overrides,
            f"teacher.pretrained={teacher}",
            f"name=demo-clipkd-{slug}",
            _objectives_override(objectives),
            "export=null",
            "eval=[]",
        ]
        run_dir = run_clipkd(load_recipe(ClipKDRecipe, "demo/clipkd-student", run_overrides))
        results[f"distilled: {label}"] = zero_shot("kd-tiny-student", run_dir / "model.safetensors")
    write_json_atomic(out / "clipkd_bench.json", results)
    names = [ev.name for ev in base.eval]
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{r[n]:.1f}" for n in names) + " |" for m, r in results.items()]
    write_text_atomic(out / "clipkd_bench.md", "\n".join(lines) + "\n")
    return results


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv and "=" not in argv[0] else Path("runs/clipkd-bench")
    overrides = [a for a in argv if "=" in a]
    clipkd_benchmark(out, overrides)
    print((out / "clipkd_bench.md").read_text(encoding="utf-8"), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
