"""`kdprompt export` of a whole CLIP run (clipkd, pretrain): a bundle whose class features its own text tower wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from kdprompt.deploy import load_bundle
from kdprompt.evaluate import ZeroShotClassifier
from kdprompt.models import ModelSpec, create_clip, save_clip_weights

pytestmark = pytest.mark.slow

SMALL_WORLD = ["root={root}", "train_per_class=4", "test_per_class=2", "val_per_class=1"]
CLASSES = ["red_circle", "blue square", "green_triangle"]


@pytest.fixture(scope="module")
def clipkd_run(tmp_path_factory, world_root, tiny_teacher_weights) -> Path:
    """A 2-step `kdprompt clipkd` of the tiny student on the synthetic world: runs/k/clipkd."""
    from click.testing import CliRunner

    from kdprompt.cli import main

    tmp = tmp_path_factory.mktemp("clipkd")
    args = [
        "clipkd", "demo/clipkd-student", "name=k", f"output_dir={tmp / 'runs'}",
        f"teacher.pretrained={tiny_teacher_weights}", f"shards_dir={tmp / 'shards'}", "shard_maxcount=32",
        *[f"data.{kv.format(root=world_root)}" for kv in SMALL_WORLD],
        "train.batch_size=8", "train.max_steps=2", "train.shuffle_buffer=16", "eval=[]", "export=null",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "k" / "clipkd"


@pytest.fixture()
def classes_file(tmp_path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return path


def student_clip(run: Path):
    """The run's CLIP through the public loader `kdprompt eval --zero-shot MODEL@FILE` uses."""
    return create_clip(ModelSpec(name="kd-tiny-student", pretrained=str(run / "model.safetensors")))


def test_a_clipkd_run_exports_a_bundle_with_its_own_text_features(cli, clipkd_run, classes_file, tmp_path):
    out = tmp_path / "bundle"
    # runs/<name>, not runs/<name>/clipkd: the run is found by its recorded recipe
    result = cli("export", clipkd_run.parent, out, "--classes", classes_file)
    assert result.exit_code == 0, result.output
    assert "class features: its own text tower, templates simple" in result.output

    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert manifest["text_features_from"] == "student"
    assert manifest["name"] == "k"
    assert manifest["source"]["recipe"] == "clipkd"
    assert manifest["teacher"]["model"] == "kd-tiny-teacher"
    assert manifest["model"]["projector"] == [] and manifest["model"]["prompts"] is None
    assert bundle.cache.manifest["provenance"]["text_features_from"] == "student"
    assert bundle.cache.manifest["prompts"] == [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    assert bundle.classnames == CLASSES
    assert bundle.labels == ["red circle", "blue square", "green triangle"]

    clip = student_clip(clipkd_run)
    expected = ZeroShotClassifier(clip, templates="simple").class_features(CLASSES)
    assert (bundle.cache.features - expected).abs().max().item() <= 1e-5
    assert bundle.logit_scale == pytest.approx(clip.model.logit_scale.exp().item(), rel=1e-6)
    images = torch.randn(2, *bundle.input_size)
    with torch.no_grad():
        own = F.normalize(clip.model.encode_image(images), dim=-1)
    assert (bundle.encode_images(images) - own).abs().max().item() <= 1e-5
    assert bundle.manifest["preprocess"]["size"] == list(clip.model.visual.preprocess_cfg["size"])

    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    predicted = cli("predict", out, image, "--k", "2", "--json")
    assert predicted.exit_code == 0, predicted.output
    (row,) = [json.loads(line) for line in predicted.output.splitlines() if line.startswith("{")]
    assert set(row["labels"]) <= set(bundle.labels) and len(row["probs"]) == 2


def test_the_templates_option_picks_the_template_set(clipkd_run, classes_file, tmp_path):
    from kdprompt.deploy.export_clip import export_run

    out = tmp_path / "bundle"
    manifest = export_run(clipkd_run, out, classes=classes_file, templates="ensemble")
    assert manifest["templates"] == "ensemble"
    bundle = load_bundle(out)
    assert "prompts" not in bundle.cache.manifest  # 80 per class: the provenance names the set
    assert len(bundle.cache.manifest["provenance"]["templates"]["templates"]) == 80
    expected = ZeroShotClassifier(student_clip(clipkd_run), templates="ensemble").class_features(CLASSES)
    assert (bundle.cache.features - expected).abs().max().item() <= 1e-5


def test_a_clipkd_run_without_classes_is_one_clear_error(cli, clipkd_run, tmp_path):
    out = tmp_path / "bundle"
    result = cli("export", clipkd_run, out)
    assert result.exit_code == 2
    assert "has no class list: pass --classes FILE" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


# ------------------------------------------------------------------------- a pre-training run, faked


@pytest.fixture()
def pretrain_run(tmp_path) -> Path:
    """runs/p/pretrain as `kdprompt pretrain` leaves it: recipe.yaml and the open_clip weights."""
    run = tmp_path / "runs" / "p" / "pretrain"
    run.mkdir(parents=True)
    recipe = {"recipe": "pretrain", "name": "p", "model": {"name": "kd-tiny-student", "pretrained": None}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    torch.manual_seed(1)
    save_clip_weights(create_clip(ModelSpec(name="kd-tiny-student")).model, run / "model.safetensors")
    return run


def test_a_pretrain_run_exports_too(cli, pretrain_run, classes_file, tmp_path):
    out = tmp_path / "bundle"
    result = cli("export", pretrain_run.parent, out, "--classes", classes_file)
    assert result.exit_code == 0, result.output
    bundle = load_bundle(out)
    assert bundle.manifest["source"]["recipe"] == "pretrain"
    assert bundle.manifest["teacher"]["model"] is None
    expected = ZeroShotClassifier(student_clip(pretrain_run)).class_features(CLASSES)
    assert (bundle.cache.features - expected).abs().max().item() <= 1e-5


def test_an_unfinished_clip_run_is_refused(cli, pretrain_run, classes_file, tmp_path):
    (pretrain_run / "model.safetensors").unlink()
    result = cli("export", pretrain_run, tmp_path / "bundle", "--classes", classes_file)
    assert result.exit_code == 2
    assert "has no model.safetensors: it has not finished" in result.output


def test_cache_is_refused_for_a_clip_run(cli, pretrain_run, classes_file, tmp_path):
    result = cli("export", pretrain_run, tmp_path / "bundle", "--classes", classes_file, "--cache", tmp_path)
    assert result.exit_code == 2
    assert "pass --classes FILE to encode the classes with its own text tower" in result.output


def test_classes_is_refused_for_what_is_not_a_clip_run(cli, classes_file, tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    result = cli("export", tmp_path / "runs" / "x", tmp_path / "bundle", "--classes", classes_file)
    assert result.exit_code == 2
    assert "is not one (runs/<name>/clipkd or runs/<name>/pretrain)" in result.output
    assert "pass --cache DIR instead" in result.output


def test_a_run_name_holding_a_student_and_a_clip_run_must_be_named_exactly(cli, pretrain_run, tmp_path):
    (pretrain_run.parent / "student").mkdir()
    (pretrain_run.parent / "student" / "student.json").write_text("{}", encoding="utf-8")
    result = cli("export", pretrain_run.parent, tmp_path / "bundle")
    assert result.exit_code == 2
    assert "holds several runs" in result.output and "name the one to export" in result.output
