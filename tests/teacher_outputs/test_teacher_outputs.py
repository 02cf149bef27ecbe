"""The teacher-output cache: stored features equal the online teacher's, mismatches and damage are refused,
and a distill run on it trains without building the teacher's image tower."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import distill_args, train_tiny_teacher
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision import transforms as T

from kdprompt.data.augment import (
    AugmentationConfig,
    ReplayableView,
    ViewParams,
    train_transform,
    view_converter,
)
from kdprompt.data.shard_reader import decode_sample
from kdprompt.models.teacher import PROMPTS_FILE, TEACHER_FILE, load_teacher, teacher_fingerprint
from kdprompt.teacher_outputs.manifest import part_file, read_part_metadata
from kdprompt.teacher_outputs.replay import view_index

pytestmark = pytest.mark.slow

VIEWS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world_root, tiny_teacher_weights):
    return train_tiny_teacher(tmp_path_factory.mktemp("teacher-outputs"), world_root, tiny_teacher_weights)


def recipe_args(trained, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "demo/distill-student",
        *distill_args(trained, tmp_path, "d", adaptation="prompts"),
        "evaluate=false",
        f"teacher_outputs.path={tmp_path / 'outputs'}",
        f"teacher_outputs.views={VIEWS}",
        "teacher_outputs.dtype=fp32",
        *extra,
    ]


@pytest.fixture(scope="module")
def outputs(trained, tmp_path_factory, cli_module) -> Path:
    """fp32 teacher outputs of the tiny recipe (the root of its run's files)."""
    tmp = tmp_path_factory.mktemp("outputs")
    result = cli_module("teacher-outputs", *recipe_args(trained, tmp))
    assert result.exit_code == 0, result.output
    return tmp


@pytest.fixture(scope="module")
def cli_module():
    from click.testing import CliRunner

    from kdprompt.cli import main

    def invoke(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (50, 70, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("preset", ["open_clip", "dassl"])
def test_replayed_view_is_the_train_transform_with_its_draws_made_explicit(preset):
    cfg, pre = AugmentationConfig(preset=preset), {"size": (32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    online, replay = train_transform(cfg, pre), ReplayableView(cfg, pre)
    aug = cfg.resolved()
    for i in range(8):
        img = _image(i)
        torch.manual_seed(i)
        expected = online(img)
        torch.manual_seed(i)  # the same draws, taken out of torch's RNG
        box = T.RandomResizedCrop.get_params(img, list(aug["scale"]), list(aug["ratio"]))
        flip = aug["flip"] and bool(torch.rand(1) < 0.5)
        assert torch.equal(replay.apply(img, ViewParams(*box, flip=flip)), expected)
    # Sampling from a seed is reproducible and stays inside the image.
    a, b = (replay.sample(70, 50, random.Random("k:0")) for _ in range(2))
    assert a == b and a.top >= 0 and a.top + a.height <= 50 and a.left + a.width <= 70
    assert ViewParams.from_row(a.as_row()) == a


def test_stored_features_equal_the_online_teachers_on_the_same_view(trained, outputs):
    manifest = json.loads((outputs / "outputs" / "manifest.json").read_text())
    spec = manifest["spec"]
    assert manifest["complete"] and spec["views"] == VIEWS and spec["dtype"] == "fp32"
    assert spec["teacher_fingerprint"] == load_teacher(trained["teacher"]).fingerprint
    assert [s["name"] for s in spec["shards"]] == sorted(manifest["parts"])
    assert spec["augmentation"]["scale"] == [0.9, 1.0]
    # The online step's computation (DistillStage: the student's view, converted, through the teacher).
    teacher = load_teacher(trained["teacher"])
    from kdprompt.models import ModelSpec, create_clip

    student_pre = create_clip(
        ModelSpec(name="kd-tiny-student"), load_weights=False
    ).model.visual.preprocess_cfg
    aug = AugmentationConfig()
    view = ReplayableView(aug, student_pre)
    to_teacher = view_converter(
        train_transform(aug, student_pre), train_transform(aug, teacher.clip_model.visual.preprocess_cfg)
    )
    shard = sorted((outputs / "shards").rglob("train-000000.tar"))[0]
    part = load_file(part_file(outputs / "outputs", shard.name))
    with safe_open(str(part_file(outputs / "outputs", shard.name)), "pt") as handle:
        keys = read_part_metadata(handle.metadata())["keys"]
    checked = 0
    for sample in wds.tarfile_samples([{"url": str(shard)}]):
        row = keys.index(sample["__key__"])
        img, _, _ = decode_sample(sample)
        assert list(part["image_size"][row]) == list(img.size)
        for v in range(VIEWS):
            params = ViewParams.from_row(part["params"][row, v].tolist())
            with torch.no_grad():
                online = teacher.encode_images(to_teacher(view.apply(img, params)[None]))[0]
            torch.testing.assert_close(part["features"][row, v], online, rtol=0, atol=1e-5)
        checked += 1
        if checked == 4:
            break
    assert checked == 4
    # Views differ from one another (they are real augmentations, not copies).
    assert not torch.equal(part["params"][0, 0], part["params"][0, 1])


def _other_teacher(trained, tmp_path: Path) -> Path:
    """A copy of the teacher with perturbed prompts (and so another fingerprint)."""
    other = tmp_path / "other-teacher"
    shutil.copytree(trained["teacher"], other)
    prompts = load_file(other / PROMPTS_FILE)
    name = next(iter(prompts))
    prompts[name] = prompts[name] + 0.5
    save_file(prompts, other / PROMPTS_FILE)
    meta = json.loads((other / TEACHER_FILE).read_text())
    meta["fingerprint"] = teacher_fingerprint(other / PROMPTS_FILE, meta["model"])
    (other / TEACHER_FILE).write_text(json.dumps(meta))
    return other


@pytest.mark.parametrize(
    "change, named",
    [
        ("teacher", "teacher (stored:"),
        ("data.train_per_class=3", "shards (stored:"),
        ("augmentation.preset=dassl", "augmentation (flip: stored False, recipe's True; scale:"),
        ("teacher_outputs.views=5", "views (stored: 3, recipe's: 5)"),
    ],
)
def test_outputs_of_another_teacher_shards_or_augmentation_are_refused(
    trained, outputs, cli_module, tmp_path, change, named
):
    if change == "teacher":
        # The teacher's text cache would refuse a distill first: the precompute's own check is what
        # refuses to mix two teachers' outputs in one path.
        command, override = "teacher-outputs", f"teacher={_other_teacher(trained, tmp_path)}"
    else:
        command, override = "distill", change
    args = recipe_args(trained, outputs, override, f"output_dir={tmp_path / 'runs'}")
    result = cli_module(command, *args)
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and named in lines[0] and str(outputs / "outputs") in lines[0], result.output
    assert "do not match the recipe" in lines[0]


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_a_corrupt_or_missing_part_is_named(trained, outputs, cli_module, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(outputs / "outputs", copy)
    part = part_file(copy, "train-000001.tar")
    data = bytearray(part.read_bytes())
    if damage == "flip a byte":
        data[-7] ^= 0xFF  # inside the features: same size, so only the sha256 tells
        part.write_bytes(bytes(data))
    elif damage == "truncate":
        part.write_bytes(bytes(data[:-100]))
    else:
        part.unlink()
    args = recipe_args(trained, outputs, f"teacher_outputs.path={copy}", f"output_dir={tmp_path / 'runs'}")
    result = cli_module("distill", *args)
    assert result.exit_code == 2, result.output
    error = result.output.split("error: ")[-1]  # after the progress bar the step was on
    assert str(part) in error and ("missing" if damage == "delete" else "corrupt") in error


def test_cached_distill_trains_without_building_the_teacher_image_tower(
    trained, outputs, cli_module, tmp_path, monkeypatch
):
    import kdprompt.models.loading as loading
    import kdprompt.models.teacher as teacher_module

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was built on the cached path")

    create_clip = loading.create_clip

    def student_only(spec, *args, **kwargs):
        assert spec.name != "kd-tiny-teacher", "the teacher's CLIP (image tower) was built on the cached path"
        return create_clip(spec, *args, **kwargs)

    monkeypatch.setattr(teacher_module, "load_teacher", refuse)
    monkeypatch.setattr(teacher_module.PromptedClip, "__init__", refuse)
    monkeypatch.setattr(loading, "create_clip", student_only)
    seen: list[tuple[str, int]] = []
    from kdprompt.teacher_outputs import reader

    features = reader.TeacherOutputs.features

    def spy(self, urls, keys, views):
        seen.extend(zip(keys, views, strict=True))
        return features(self, urls, keys, views)

    monkeypatch.setattr(reader.TeacherOutputs, "features", spy)
    args = recipe_args(trained, outputs, f"output_dir={tmp_path / 'runs'}")
    result = cli_module("distill", *args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "d" / "student"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher_outputs"]["views"] == VIEWS
    # Each step read the view its epoch picked for each key (seeded by the run's seed, epoch and key).
    per_epoch = metrics["steps"] // 2
    assert len(seen) == metrics["steps"] * 16
    for i, (key, view) in enumerate(seen):
        assert view == view_index(1, (i // 16) // per_epoch, key, VIEWS)
    assert len({v for _, v in seen}) > 1


def test_two_processes_write_disjoint_parts_equal_to_one_process(trained, outputs, tmp_path):
    from conftest import accelerate_launch

    root = tmp_path / "two"
    args = recipe_args(trained, outputs, f"teacher_outputs.path={root}")
    accelerate_launch(["teacher-outputs", *args], processes=2)
    one = json.loads((outputs / "outputs" / "manifest.json").read_text())
    two = json.loads((root / "manifest.json").read_text())
    assert two["complete"] and two["spec"] == one["spec"] and set(two["parts"]) == set(one["parts"])
    for shard in one["parts"]:
        a, b = load_file(part_file(outputs / "outputs", shard)), load_file(part_file(root, shard))
        assert torch.equal(a["params"], b["params"]) and torch.equal(a["image_size"], b["image_size"])
        torch.testing.assert_close(a["features"], b["features"], rtol=0, atol=1e-6)


def test_loader_workers_write_the_parts_one_process_writes(trained, outputs, cli_module, tmp_path):
    """Decoding in 2 loader workers (train.num_workers) keeps shard order and every stored value."""
    root = tmp_path / "workers"
    args = recipe_args(trained, outputs, f"teacher_outputs.path={root}", "train.num_workers=2")
    result = cli_module("teacher-outputs", *args)
    assert result.exit_code == 0, result.output
    one = json.loads((outputs / "outputs" / "manifest.json").read_text())
    for shard in one["parts"]:
        a, b = load_file(part_file(outputs / "outputs", shard)), load_file(part_file(root, shard))
        assert torch.equal(a["params"], b["params"]) and torch.equal(a["image_size"], b["image_size"])
        torch.testing.assert_close(a["features"], b["features"], rtol=0, atol=1e-6)
        with safe_open(str(part_file(root, shard)), framework="pt") as handle:
            keys_b = read_part_metadata(handle.metadata())["keys"]
        with safe_open(str(part_file(outputs / "outputs", shard)), framework="pt") as handle:
            keys_a = read_part_metadata(handle.metadata())["keys"]
        assert keys_a == keys_b and len(keys_a) > 2


def test_views_are_encoded_a_batch_at_a_time(trained, outputs, cli_module, tmp_path, monkeypatch):
    """The teacher sees at most teacher_outputs.batch_size views per forward (a shard's views are not held)."""
    from kdprompt.teacher_outputs import precompute

    seen: list[int] = []
    encode = precompute._Encoder.encode
    monkeypatch.setattr(precompute._Encoder, "encode", lambda self, v: seen.append(len(v)) or encode(self, v))
    root = tmp_path / "batched"
    args = recipe_args(trained, outputs, f"teacher_outputs.path={root}", "teacher_outputs.batch_size=4")
    result = cli_module("teacher-outputs", *args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "manifest.json").read_text())
    assert sum(seen) == manifest["stats"]["images"] * VIEWS
    # Whole batches: only a part's last one may be short.
    assert max(seen) == 4 and sum(n < 4 for n in seen) <= len(manifest["parts"])
