"""Stage one: PromptSRC / MaPLe teachers, GPA, resume, the text-feature cache, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import accelerate_launch, assert_dassl_lr_per_epoch
from safetensors.torch import load_file

from kdprompt.config.loading import load_recipe
from kdprompt.config.teacher import TeacherRecipe
from kdprompt.errors import KdpromptError
from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.prompt_methods import MaPLeConfig, PromptSRCConfig
from kdprompt.models.prompt_methods.promptsrc import gaussian_epoch_weights
from kdprompt.models.teacher import PromptedClip, load_teacher
from kdprompt.text_features import load_cache
from kdprompt.train.checkpoint import list_checkpoints, load_checkpoint

CLASSES = ["red circle", "blue star", "green ring"]


def test_promptsrc_init_equals_frozen_text_features():
    torch.manual_seed(0)
    clip = create_clip(ModelSpec(name="kd-tiny-teacher"))
    model = PromptedClip(clip, PromptSRCConfig(text_depth=1, vision_depth=2), name="t")
    with torch.no_grad():
        prompted = model.class_features(CLASSES)
        frozen = F.normalize(
            clip.model.encode_text(clip.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1
        )
    assert (prompted - frozen).abs().max().item() <= 1e-6


def test_deep_prompts_change_features_and_only_prompts_train():
    torch.manual_seed(0)
    clip = create_clip(ModelSpec(name="kd-tiny-teacher"))
    model = PromptedClip(clip, PromptSRCConfig(text_depth=3, vision_depth=3), name="t")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("learner.") for n in trainable)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.encode_images(images), model.frozen_image_features(images))


def test_maple_couplings_take_widths_from_the_model(tmp_path):
    cfg = {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 3, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
    }
    path = tmp_path / "kd-odd-widths.json"
    path.write_text(json.dumps(cfg))
    model = PromptedClip(create_clip(ModelSpec(name=str(path))), MaPLeConfig(depth=3), name="m")
    shapes = [tuple(c.weight.shape) for c in model.learner.couplings]
    assert shapes == [(96, 64)] * 3
    with torch.no_grad():
        assert model.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, 48)
        assert model.class_features(CLASSES).shape == (3, 48)


def test_prompt_depth_beyond_the_model_names_the_field():
    clip = create_clip(ModelSpec(name="kd-tiny-teacher"))
    with pytest.raises(KdpromptError, match=r"method.vision_depth is 9, but the tower has 4 blocks"):
        PromptedClip(clip, PromptSRCConfig(text_depth=2, vision_depth=9), name="t")
    # A phrase longer than the context is fine (its first tokens are learned); a shorter one is not.
    with pytest.raises(
        KdpromptError, match="ctx_init 'a photo of a' is 4 tokens but the context length is 6"
    ):
        PromptedClip(clip, PromptSRCConfig(n_ctx_text=6, text_depth=2, vision_depth=2), name="t")


def test_gaussian_weights():
    w = gaussian_epoch_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1.0) and max(range(20), key=w.__getitem__) == 14
    assert gaussian_epoch_weights(3, 100, 1) == [0.0, 0.0, 1.0]


@pytest.fixture()
def teacher_args(tmp_path, world_root, tiny_teacher_weights):
    """Overrides shrinking a demo teacher recipe to seconds: ``teacher_args(name, method)``."""

    def make(name: str, method: str = "promptsrc") -> list[str]:
        return _teacher_args(tmp_path, world_root, tiny_teacher_weights, name, method)

    return make


def _teacher_args(tmp_path: Path, world_root: str, weights: str, name: str, method: str) -> list[str]:
    world = [f"root={world_root}", "train_per_class=4", "test_per_class=2", "val_per_class=1"]
    args = [
        f"name={name}",
        f"output_dir={tmp_path / 'runs'}",
        f"model.pretrained={weights}",
        *[f"data.{kv}" for kv in world],
        "fewshot.shots=2",
        "train.batch_size=8",
        "train.epochs=3",
        "train.log_every=1",
        f"cache_dir={tmp_path / 'cache' / name}",
        "checkpoint.keep_last=100",
    ]
    if method == "promptsrc":
        args += ["method.text_depth=2", "method.vision_depth=2", "method.gpa.mean=2", "method.gpa.std=1"]
    else:
        args += ["method.depth=2"]
    return args


@pytest.mark.slow
def test_promptsrc_teacher_cli_gpa_cache_and_eval(cli, tmp_path, teacher_args):
    result = cli("teacher", "demo/teacher-promptsrc", *teacher_args("src"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "src" / "teacher"
    meta = json.loads((run / "teacher.json").read_text())
    assert meta["method"]["name"] == "promptsrc" and len(meta["classnames"]) == 24
    assert len(meta["all_classnames"]) == 48 and meta["selection"] == "gpa"
    metrics = json.loads((run / "metrics.json").read_text())
    names = [row["model"] for row in metrics["eval"]]
    assert len(names) == 2 and all({"base", "novel", "hm", "all"} <= set(r) for r in metrics["eval"])
    assert (run / "curves.png").is_file() and (run / "eval.md").is_file()

    # GPA: the shipped prompts are the Gaussian-weighted sum of the epoch-end states.
    epoch_ends = [load_checkpoint(p) for p in list_checkpoints(run / "checkpoints")]
    epoch_ends = [c for c in epoch_ends if c.meta["epoch_end"]]
    assert len(epoch_ends) == 3
    weights = gaussian_epoch_weights(3, 2, 1)
    prompts = load_file(str(run / "prompts.safetensors"))
    for key, value in prompts.items():
        expected = sum(w * c.weights[f"learner.{key}"] for w, c in zip(weights, epoch_ends, strict=True))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(value, epoch_ends[-1].weights[f"learner.{key}"])

    # The cache covers all classes, matches the teacher, and loads without it.
    cache = load_cache(tmp_path / "cache" / "src", expect_fingerprint=meta["fingerprint"])
    teacher = load_teacher(run)
    with torch.no_grad():
        direct = teacher.class_features(teacher.all_classnames)
    torch.testing.assert_close(cache.features, direct, rtol=0, atol=1e-5)
    assert cache.classnames == meta["all_classnames"]


@pytest.mark.slow
def test_maple_teacher_cli_and_new_class_cache(cli, tmp_path, teacher_args):
    result = cli("teacher", "demo/teacher-maple", *teacher_args("maple", "maple"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "maple" / "teacher"
    assert json.loads((run / "teacher.json").read_text())["selection"] == "last"

    classes = tmp_path / "new.txt"
    classes.write_text("# new classes\nwhite hexagon\nblack moon\n\norange arrow\n")
    out = tmp_path / "newcache"
    made = cli("cache", run, "--classes", classes, "--out", out)
    assert made.exit_code == 0, made.output
    teacher = load_teacher(run)
    cache = load_cache(
        out,
        expect_fingerprint=teacher.fingerprint,
        expect_classnames=["white hexagon", "black moon", "orange arrow"],
    )
    with torch.no_grad():
        direct = teacher.class_features(cache.classnames)
    torch.testing.assert_close(cache.features, direct, rtol=0, atol=1e-5)

    # A cache built for one teacher is refused for another.
    other = cli("teacher", "demo/teacher-maple", *teacher_args("maple2", "maple"), "seed=5")
    assert other.exit_code == 0, other.output
    other_fp = load_teacher(tmp_path / "runs" / "maple2" / "teacher").fingerprint
    with pytest.raises(KdpromptError) as err:
        load_cache(out, expect_fingerprint=other_fp)
    assert other_fp in str(err.value) and teacher.fingerprint in str(err.value)


@pytest.mark.slow
def test_teacher_resume_matches_uninterrupted_run(cli, tmp_path, teacher_args):
    full = cli("teacher", "demo/teacher-promptsrc", *teacher_args("full"), "evaluate=false")
    assert full.exit_code == 0, full.output
    part_args = [*teacher_args("part"), "evaluate=false"]
    first = cli("teacher", "demo/teacher-promptsrc", *part_args, "train.stop_after_steps=4")  # mid-epoch 2
    assert first.exit_code == 0, first.output
    assert not (tmp_path / "runs" / "part" / "teacher" / "prompts.safetensors").exists()
    second = cli("teacher", "demo/teacher-promptsrc", *part_args)
    assert second.exit_code == 0, second.output
    a = load_file(str(tmp_path / "runs" / "full" / "teacher" / "prompts.safetensors"))
    b = load_file(str(tmp_path / "runs" / "part" / "teacher" / "prompts.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_load_teacher_errors(tmp_path):
    with pytest.raises(KdpromptError, match=r"teacher\.json is missing"):
        load_teacher(tmp_path)


def test_teacher_needs_base_weights(cli, tmp_path, teacher_args):
    result = cli("teacher", "demo/teacher-promptsrc", *teacher_args("nw"), "model.pretrained=null")
    assert result.exit_code == 2 and "model.pretrained is not set" in result.output


@pytest.mark.slow
def test_eval_cli_reports_a_teacher_like_its_run(cli, tmp_path, teacher_args):
    assert cli("teacher", "demo/teacher-maple", *teacher_args("ev", "maple")).exit_code == 0
    run = tmp_path / "runs" / "ev" / "teacher"
    out = tmp_path / "eval"
    result = cli("eval", "--teacher", run, "--out", out, "--device", "cpu")  # data from teacher.json
    assert result.exit_code == 0, result.output
    assert "| model |" in result.output
    rows = json.loads((out / "metrics.json").read_text())
    own = json.loads((run / "metrics.json").read_text())["eval"][1]
    for key in ("base", "novel", "all", "hm"):
        assert rows[0][key] == pytest.approx(own[key], abs=1e-6)


@pytest.mark.dist
def test_two_process_teacher_run(tmp_path, world_root, tiny_teacher_weights):
    accelerate_launch(
        [
            "teacher",
            "demo/teacher-promptsrc",
            *_teacher_args(tmp_path, world_root, tiny_teacher_weights, "dist", "promptsrc"),
            "train.epochs=2",
        ]
    )
    run = tmp_path / "runs" / "dist" / "teacher"
    meta = json.loads((run / "teacher.json").read_text())
    # 24 base classes x 2 shots = 48 images, batch 8 per process over 2 processes: 3 steps per epoch.
    assert meta["steps"] == 6
    load_cache(tmp_path / "cache" / "dist", expect_fingerprint=meta["fingerprint"])


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_recipe(cli, tmp_path, teacher_args):
    first = cli("teacher", "demo/teacher-promptsrc", *teacher_args("same"), "train.stop_after_steps=1")
    assert first.exit_code == 0, first.output
    changed = cli("teacher", "demo/teacher-promptsrc", *teacher_args("same"), "seed=9")
    assert changed.exit_code == 2
    assert "written by a different recipe" in changed.output and "resume=never" in changed.output
    fresh = cli(
        "teacher",
        "demo/teacher-promptsrc",
        *teacher_args("same"),
        "seed=9",
        "resume=never",
        "train.stop_after_steps=1",
    )
    assert fresh.exit_code == 0, fresh.output


@pytest.mark.slow
def test_teacher_with_dassl_schedule_and_augmentation(cli, tmp_path, teacher_args):
    args = [*teacher_args("dassl", "maple"), "evaluate=false", "train.lr_schedule=dassl"]
    result = cli("teacher", "demo/teacher-maple", *args, "augmentation.preset=dassl")
    assert result.exit_code == 0, result.output
    recipe = load_recipe(TeacherRecipe, "demo/teacher-maple", args)
    assert_dassl_lr_per_epoch(tmp_path / "runs" / "dassl" / "teacher" / "metrics.jsonl", recipe.train)
