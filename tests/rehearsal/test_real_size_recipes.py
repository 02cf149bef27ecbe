"""Rehearsal at real size: the shipped OxfordPets recipes, end to end, with the real architectures.

``kdprompt teacher base2novel/oxford_pets/promptsrc-vit-l-14`` (PromptSRC on ViT-L-14, 224 px, 4+4
context tokens at depth 9 in both towers, PromptSRC's 60-template frozen text ensemble, Dassl's
augmentation and schedule, GPA, ``zero_shot_templates: coop``), then ``kdprompt distill
base2novel/oxford_pets/distill-vit-b-16`` (ViT-B-16 with 4 visual prompts at depth 9, MLP projector
512 -> 768, KL), ``kdprompt export`` and ``kdprompt predict``, all through the CLI, on a tiny
OxfordPets in CoOp's layout (4 classes whose names have underscores, 500x375 JPEGs, CoOp's split
JSON) with randomly initialised weights files written here (no network, no pretrained weights).

The recipes run as shipped except for these overrides:

- paths: ``data.root``, ``model.pretrained`` / ``student.model.pretrained`` (the random weights
  files), ``output_dir``, ``cache_dir``, ``teacher``, ``cache``, ``shards_dir``;
- ``train.max_steps=2`` in both stages (the batch size stays the recipes' 8);
- nothing else: the recipes' templates (``method.templates: promptsrc``, 60 templates over the 2
  base classes), ``fewshot.shots: 16`` (drawn with replacement from 4 images a class, as Dassl does)
  and ``evaluate: true`` are kept; the test split is made small instead (1 image a class), so the
  end-of-run evaluations (the teacher's zero-shot and prompted rows, the distilled student's) are
  cheap but still run.

4-6 minutes on 2 busy CPU cores, 7.5 GB of memory at peak (measured: 3:53 and 5:41). In seconds: the
teacher 150-225 (its 2 steps of 8 ViT-L-14 images most of it, the 60-template ensemble ~11, the
end-of-run evaluation and cache ~25), the distillation 60-80, data and weights files 11-25, export
and predict ~8. Marked ``slow`` and ``rehearsal``: ``make test`` runs it, ``-m "not rehearsal"``
leaves it out; ``pytest -s`` prints the seconds per stage.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from kdprompt.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.rehearsal]

DATASET = "oxford_pets"
TEACHER_RECIPE = f"base2novel/{DATASET}/promptsrc-vit-l-14"
STUDENT_RECIPE = f"base2novel/{DATASET}/distill-vit-b-16"
# OxfordPets breeds, in label order; base = the first ceil(4 / 2) = 2, novel = the other 2.
CLASSES = ["american_bulldog", "american_pit_bull_terrier", "basset_hound", "english_cocker_spaniel"]
PER_SPLIT = {"train": 4, "val": 1, "test": 1}  # images a class
PHOTO_SIZE = (500, 375)  # a typical OxfordPets photo
MAX_STEPS = 2
DEPTH, N_CTX = 9, 4
VIT_L_VISION_WIDTH, VIT_L_TEXT_WIDTH, VIT_L_EMBED = 1024, 768, 768
VIT_B_VISION_WIDTH, VIT_B_EMBED = 768, 512

TIMES: dict[str, float] = {}  # stage -> seconds, printed at the end of the module (pytest -s)


def run_cli(*args: object) -> str:
    """``kdprompt ARGS`` in-process; fails the test with the output on a non-zero exit."""
    start = time.perf_counter()
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    TIMES[str(args[0])] = time.perf_counter() - start
    assert result.exit_code == 0, result.output[-5000:]
    return result.output


def photo(rng: np.random.Generator, label: int) -> Image.Image:
    """A photo-sized RGB image: a per-class colour gradient plus noise."""
    w, h = PHOTO_SIZE
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            (xs / w) * 255 * (label % 2),
            (ys / h) * 255 * ((label // 2) % 2),
            ((xs + ys) / (w + h)) * 255,
        ],
        axis=-1,
    )
    pixels = np.clip(base + rng.normal(0, 40, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_oxford_pets(root: Path) -> Path:
    """``root/oxford_pets/images/<breed>_<n>.jpg`` and ``split_zhou_OxfordPets.json`` (CoOp's rows:
    ``[image path relative to images/, label, class name]``), plus the unread ``annotations/``."""
    dataset = root / DATASET
    images = dataset / "images"
    images.mkdir(parents=True)
    (dataset / "annotations").mkdir()
    rng = np.random.default_rng(0)
    splits: dict[str, list[list]] = {split: [] for split in PER_SPLIT}
    counter = 0
    for label, name in enumerate(CLASSES):
        for split, count in PER_SPLIT.items():
            for _ in range(count):
                counter += 1
                rel = f"{name}_{counter}.jpg"
                photo(rng, label).save(images / rel, format="JPEG", quality=90)
                splits[split].append([rel, label, name])
    (dataset / "split_zhou_OxfordPets.json").write_text(json.dumps(splits), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, request) -> dict[str, Path]:
    """The fake OxfordPets and randomly initialised ViT-L-14 / ViT-B-16 weights files (seeded).

    The weights files (2.2 GB, rebuilt from their seeds) are deleted afterwards, and so is everything
    else (another 1 GB) when no test failed; pytest keeps the last three temporary roots.
    """
    from kdprompt.models import ModelSpec, create_clip, save_clip_weights

    start = time.perf_counter()
    root = tmp_path_factory.mktemp("real-size")
    make_oxford_pets(root / "coop")
    paths = {"root": root, "coop": root / "coop"}
    for seed, name in enumerate(("ViT-L-14", "ViT-B-16")):
        torch.manual_seed(seed)
        clip = create_clip(ModelSpec(name=name))
        paths[name] = save_clip_weights(clip.model, root / f"{name}-random.safetensors")
        del clip
        gc.collect()
    TIMES["fixture (data + weights)"] = time.perf_counter() - start
    yield paths
    print("\nreal-size rehearsal, seconds per stage:")
    for stage, seconds in TIMES.items():
        print(f"  {stage:<26} {seconds:7.1f}")
    for name in ("ViT-L-14", "ViT-B-16"):
        paths[name].unlink(missing_ok=True)
    if request.session.testsfailed == 0:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def teacher_run(world) -> dict:
    from kdprompt.config.loading import load_recipe
    from kdprompt.config.teacher import TeacherRecipe

    root = world["root"]
    overrides = [
        f"data.root={world['coop']}",
        f"model.pretrained={world['ViT-L-14']}",
        f"output_dir={root / 'runs'}",
        f"cache_dir={root / 'cache' / 'teacher'}",
        f"train.max_steps={MAX_STEPS}",
    ]
    output = run_cli("teacher", TEACHER_RECIPE, *overrides)
    gc.collect()
    recipe = load_recipe(TeacherRecipe, TEACHER_RECIPE, overrides)
    return {
        "output": output,
        "recipe": recipe,
        "dir": root / "runs" / recipe.name / "teacher",
        "cache": root / "cache" / "teacher",
    }


@pytest.fixture(scope="module")
def student_run(world, teacher_run) -> dict:
    from kdprompt.config.distill import DistillRecipe
    from kdprompt.config.loading import load_recipe

    root = world["root"]
    overrides = [
        f"data.root={world['coop']}",
        f"teacher={teacher_run['dir']}",
        f"cache={teacher_run['cache']}",
        f"student.model.pretrained={world['ViT-B-16']}",
        f"output_dir={root / 'runs'}",
        f"shards_dir={root / 'shards'}",
        f"train.max_steps={MAX_STEPS}",
    ]
    output = run_cli("distill", STUDENT_RECIPE, *overrides)
    gc.collect()
    recipe = load_recipe(DistillRecipe, STUDENT_RECIPE, overrides)
    return {"output": output, "recipe": recipe, "dir": root / "runs" / recipe.name / "student"}


@pytest.fixture(scope="module")
def bundle(world, student_run) -> Path:
    out = world["root"] / "bundle"
    run_cli("export", student_run["dir"], out)
    return out


def test_teacher_run(teacher_run):
    recipe = teacher_run["recipe"]
    meta = json.loads((teacher_run["dir"] / "teacher.json").read_text())
    assert meta["model"]["name"] == recipe.model.name == "ViT-L-14" and meta["model"]["pretrained_sha256"]
    # The run used the recipe's method as shipped: PromptSRC, 4 + 4 tokens at depth 9 in both towers.
    assert meta["method"] == recipe.method.model_dump(mode="json")
    method = meta["method"]
    assert method["name"] == "promptsrc" and method["templates"] == "promptsrc"
    assert (method["text_depth"], method["vision_depth"]) == (DEPTH, DEPTH)
    assert (method["n_ctx_text"], method["n_ctx_vision"]) == (N_CTX, N_CTX)
    assert meta["classnames"] == CLASSES[:2] and meta["all_classnames"] == CLASSES
    assert meta["classname_form"] == "spaces"
    assert meta["steps"] == MAX_STEPS and meta["fewshot"] == recipe.fewshot.model_dump(mode="json")
    # K shots of each base class, drawn with replacement from 4 images a class (Dassl's repeat=True).
    assert meta["train_images"] == recipe.fewshot.shots * 2

    prompts = load_file(teacher_run["dir"] / "prompts.safetensors")
    text = [prompts["ctx"]] + [prompts[f"deep_text.{i}"] for i in range(DEPTH - 1)]
    vision = [prompts[f"vision.{i}"] for i in range(DEPTH)]
    assert set(prompts) == {"ctx", *(f"deep_text.{i}" for i in range(DEPTH - 1))} | {
        f"vision.{i}" for i in range(DEPTH)
    }
    assert all(t.shape == (N_CTX, VIT_L_TEXT_WIDTH) for t in text)
    assert all(v.shape == (N_CTX, VIT_L_VISION_WIDTH) for v in vision)
    assert all(torch.isfinite(t).all() for t in prompts.values())

    # The recipe's end of run: metrics, the evaluation table (zero-shot CoOp template + prompted
    # rows, base / novel / HM on the test split), curves, checkpoints.
    metrics = json.loads((teacher_run["dir"] / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS
    assert metrics["zero_shot_templates"] == recipe.zero_shot_templates == "coop"
    assert len(metrics["eval"]) == 2
    assert (teacher_run["dir"] / "eval.md").is_file() and (teacher_run["dir"] / "curves.png").is_file()
    rows = [json.loads(line) for line in (teacher_run["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    recipe = (teacher_run["dir"] / "recipe.yaml").read_text()
    assert "preset: dassl" in recipe and "lr_schedule: dassl" in recipe


def test_teacher_cache(teacher_run):
    cache = teacher_run["cache"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["classnames"] == CLASSES and manifest["embed_dim"] == VIT_L_EMBED
    assert manifest["num_classes"] == len(CLASSES)
    # Underscores become spaces in the text encoded (every reference does), never in the class names.
    for name, prompt in zip(CLASSES, manifest["prompts"], strict=True):
        assert name.replace("_", " ") in prompt and "_" not in prompt
    with safe_open(cache / "text_features.safetensors", "pt") as f:
        features = f.get_tensor(next(iter(f.keys())))
    assert features.shape == (len(CLASSES), VIT_L_EMBED)
    assert torch.allclose(features.float().norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-3)
    assert (cache / "index.faiss").is_file()


def test_student_run(student_run, teacher_run):
    recipe = student_run["recipe"]
    meta = json.loads((student_run["dir"] / "student.json").read_text())
    assert meta["student"]["model"]["name"] == recipe.student.model.name == "ViT-B-16"
    assert meta["objectives"] == {k: v.model_dump(mode="json") for k, v in recipe.objectives.items()}
    assert (meta["student"]["adaptation"], meta["student"]["depth"], meta["student"]["n_ctx"]) == (
        "prompts",
        DEPTH,
        N_CTX,
    )
    assert meta["embed_dim"] == VIT_L_EMBED and meta["cache"]["num_classes"] == len(CLASSES)
    teacher_meta = json.loads((teacher_run["dir"] / "teacher.json").read_text())
    assert meta["teacher"]["fingerprint"] == teacher_meta["fingerprint"]

    weights = load_file(student_run["dir"] / "student.safetensors")
    prompts = sorted(k for k in weights if k.startswith("prompts."))
    assert len(prompts) == DEPTH
    assert all(weights[k].shape == (N_CTX, VIT_B_VISION_WIDTH) for k in prompts)
    # PromptKD's projector: Linear(512, 768) - BatchNorm - ReLU - Linear(768, 768).
    assert weights["projector.0.weight"].shape == (VIT_L_EMBED, VIT_B_EMBED)
    assert weights["projector.3.weight"].shape == (VIT_L_EMBED, VIT_L_EMBED)

    metrics = json.loads((student_run["dir"] / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS and metrics["selection"] == "last"
    assert len(metrics["eval"]) == 2  # the teacher's and the student's rows on the test split
    assert metrics["image_tower_parameters"] < metrics["teacher_image_tower_parameters"]
    assert "preset: dassl" in (student_run["dir"] / "recipe.yaml").read_text()


def test_export_and_predict(bundle, world):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["classes"]["num_classes"] == len(CLASSES)
    params = manifest["parameters"]
    assert params["prompts"] == DEPTH * N_CTX * VIT_B_VISION_WIDTH
    assert (bundle / "encoder.safetensors").is_file() and (bundle / "cache" / "manifest.json").is_file()

    images = sorted((world["coop"] / DATASET / "images").glob("*.jpg"))[:2]
    output = run_cli("predict", bundle, *images, "--k", "2", "--json")
    results = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [Path(r["image"]).name for r in results] == [p.name for p in images]
    labels = {name.replace("_", " ") for name in CLASSES}
    for r in results:
        assert len(r["labels"]) == 2 and set(r["labels"]) <= labels
        assert sum(r["probs"]) <= 1.0 + 1e-5
