"""Stage two: distill a student from unlabelled shards, through the CLI, resumable, multi-process."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    TINY_WORLD,
    accelerate_launch,
    assert_dassl_lr_per_epoch,
    distill_args,
    train_tiny_teacher,
)
from safetensors.torch import load_file

from kdprompt.config.distill import DistillRecipe
from kdprompt.config.loading import load_recipe
from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.student import Student, StudentConfig, count_parameters, load_student
from kdprompt.models.teacher import load_teacher
from kdprompt.objectives import DistillObjectives
from kdprompt.text_features import build_cache, load_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world_root, tiny_teacher_weights):
    """A tiny PromptSRC teacher with its cache, and student weights standing in for a pre-trained student."""
    return train_tiny_teacher(tmp_path_factory.mktemp("distill"), world_root, tiny_teacher_weights)


@pytest.mark.parametrize("adaptation", ["prompts", "full", "projector"])
def test_distill_each_adaptation_through_the_cli(cli, tmp_path, trained, adaptation):
    result = cli("distill", "demo/distill-student", *distill_args(trained, tmp_path, "d", adaptation))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "d" / "student"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"kl", "fd", "icl_image", "crd_image", "loss"} <= set(r) for r in rows)
    meta = json.loads((run / "student.json").read_text())
    assert meta["student"]["adaptation"] == adaptation
    assert meta["teacher"]["fingerprint"] == load_teacher(trained["teacher"]).fingerprint
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"base", "novel", "hm"} <= set(metrics["eval"][1])
    student, cache = load_student(run)
    with torch.no_grad():
        feats = student(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, cache.embed_dim)
    # Only what the adaptation trains has changed.
    before = create_clip(ModelSpec(name="kd-tiny-student", pretrained=str(trained["student"]))).model.visual
    after = student.visual
    same = all(
        torch.equal(a, b)
        for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    )
    assert same == (adaptation != "full")


def test_kill_and_resume_gives_the_same_student(cli, tmp_path, trained):
    assert cli("distill", "demo/distill-student", *distill_args(trained, tmp_path, "full")).exit_code == 0
    part = distill_args(trained, tmp_path, "part")
    first = cli("distill", "demo/distill-student", *part, "train.stop_after_steps=3")
    assert first.exit_code == 0, first.output
    second = cli("distill", "demo/distill-student", *part)
    assert second.exit_code == 0, second.output
    a = load_file(str(tmp_path / "runs" / "full" / "student" / "student.safetensors"))
    b = load_file(str(tmp_path / "runs" / "part" / "student" / "student.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.dist
def test_two_process_distill_disjoint_shards_identical_weights(tmp_path, trained):
    accelerate_launch(
        [
            "distill",
            "demo/distill-student",
            *distill_args(trained, tmp_path, "dist"),
            "train.batch_size=8",
            "train.epochs=1",
        ]
    )
    run = tmp_path / "runs" / "dist" / "student"
    records = [json.loads((run / "data" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert not set(records[0]["shards"]) & set(records[1]["shards"])
    assert records[0]["samples"] == records[1]["samples"] > 0
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]


def test_student_never_changes_the_teacher(trained):
    teacher = load_teacher(trained["teacher"])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cache = load_cache(trained["cache"])
    recipe = load_recipe(DistillRecipe, "demo/distill-student")
    cfg = StudentConfig(model=ModelSpec(name="kd-tiny-student"), adaptation="full", projector="mlp")
    student = Student(create_clip(cfg.model), cfg, out_dim=cache.embed_dim)
    objectives = DistillObjectives(recipe.objectives)
    params = [*student.parameters(), *objectives.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    from kdprompt.objectives import DistillBatch

    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        t = teacher.encode_images(images)
    out = objectives(
        DistillBatch(
            student=student(images),
            teacher=t,
            text=cache.features,
            logit_scale=torch.tensor(cache.logit_scale),
        )
    )
    out["loss"].backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_stale_cache_is_refused(cli, tmp_path, trained):
    stale = tmp_path / "stale"
    cache = load_cache(trained["cache"])
    build_cache(
        cache.features, cache.classnames, stale, teacher_fingerprint="0" * 64, logit_scale=cache.logit_scale
    )
    result = cli("distill", "demo/distill-student", *distill_args(trained, tmp_path, "s"), f"cache={stale}")
    assert result.exit_code == 2
    assert "0" * 64 in result.output and load_teacher(trained["teacher"]).fingerprint in result.output


def test_compact_student_is_at_most_a_third_of_the_teacher():
    teacher = create_clip(ModelSpec(name="kd-tiny-teacher")).model.visual
    student = create_clip(ModelSpec(name="kd-tiny-student")).model.visual
    assert count_parameters(student) * 3 <= count_parameters(teacher)


def test_eval_cli_reports_the_student_like_its_run(cli, tmp_path, trained):
    assert cli("distill", "demo/distill-student", *distill_args(trained, tmp_path, "ev")).exit_code == 0
    run = tmp_path / "runs" / "ev" / "student"
    out = tmp_path / "eval"
    teacher_data = [f"root={trained['world_root']}", *TINY_WORLD]
    result = cli(
        "eval",
        "--teacher",
        trained["teacher"],
        "--student",
        run,
        "--out",
        out,
        "--device",
        "cpu",
        *teacher_data,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["kind"] for r in rows] == ["teacher", "student"]
    own = json.loads((run / "metrics.json").read_text())["eval"]
    for mine, theirs in zip(rows, own, strict=True):
        for key in ("base", "novel", "all", "hm"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6)


def test_bench_distill_prints_both_throughputs(cli, tmp_path, trained):
    result = cli(
        "bench", "distill", "demo/distill-student", *distill_args(trained, tmp_path, "b"), "--steps", "2"
    )
    assert result.exit_code == 0, result.output
    # stdout alone: model loading reports what it loaded on stderr
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["cached_images_per_s"] > 0 and figures["recomputed_images_per_s"] > 0
    assert figures["speedup"] == pytest.approx(
        figures["cached_images_per_s"] / figures["recomputed_images_per_s"]
    )


def test_teacher_sees_the_students_augmented_view():
    from PIL import Image

    from kdprompt.data.augment import AugmentationConfig, train_transform, view_converter

    # Two models with one image size but different normalisations: the converted student view is what
    # the teacher's own transform makes of the same random crop and flip.
    aug = AugmentationConfig(preset="dassl")
    student_tf = train_transform(aug, {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.3, 0.4)})
    teacher_tf = train_transform(aug, {"size": 32, "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28)})
    to_teacher = view_converter(student_tf, teacher_tf)
    image = Image.fromarray(torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8).numpy())
    for seed in range(4):
        torch.manual_seed(seed)
        student_view = student_tf(image)
        torch.manual_seed(seed)
        teacher_view = teacher_tf(image)
        torch.testing.assert_close(to_teacher(student_view[None])[0], teacher_view, rtol=0, atol=1e-5)


def test_distill_with_dassl_schedule_and_augmentation(cli, tmp_path, trained):
    args = [*distill_args(trained, tmp_path, "dassl", "prompts"), "train.lr_schedule=dassl"]
    result = cli("distill", "demo/distill-student", *args, "augmentation.preset=dassl", "evaluate=false")
    assert result.exit_code == 0, result.output
    recipe = load_recipe(DistillRecipe, "demo/distill-student", args)
    assert_dassl_lr_per_epoch(tmp_path / "runs" / "dassl" / "student" / "metrics.jsonl", recipe.train)


def test_the_frozen_teacher_gets_the_throughput_settings(cli, tmp_path, trained, monkeypatch):
    # The teacher's image tower runs on every batch but is not stage.model, which the run scaffold
    # applies train.channels_last / compile to: setup applies them to it, leaving it out of DDP.
    from kdprompt.models.teacher import Teacher
    from kdprompt.train.distill_loop import DistillStage

    stages: list[DistillStage] = []
    setup = DistillStage.setup

    def recording(self, run):
        setup(self, run)
        stages.append(self)

    monkeypatch.setattr(DistillStage, "setup", recording)
    args = [
        *distill_args(trained, tmp_path, "cl", "prompts"),
        "train.channels_last=true",
        "train.max_steps=1",
    ]
    result = cli("distill", "demo/distill-student", *args)
    assert result.exit_code == 0, result.output
    teacher = stages[0].teacher
    assert type(teacher) is Teacher and not teacher.training
    assert teacher.vision_tower.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in teacher.parameters())
