"""Base/novel/HM evaluation (``evaluate_base_novel``) and the ``kdprompt eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from kdprompt.classifiers import parse_zero_shot
from kdprompt.cli.evaluation import eval_command
from kdprompt.data.protocol import subsample_classes
from kdprompt.data.sources import load_split
from kdprompt.data.synthetic import SyntheticData
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError
from kdprompt.evaluate import (
    ImageTextClassifier,
    ZeroShotClassifier,
    evaluate_base_novel,
    evaluation_table,
    harmonic_mean,
    zero_shot_accuracy,
)
from kdprompt.models.loading import create_clip, save_clip_weights
from kdprompt.models.spec import ModelSpec

SMALL_WORLD = {"domain": "downstream", "train_per_class": 4, "test_per_class": 2, "val_per_class": 1}


@pytest.fixture(scope="module")
def test_split(world_root) -> Split:
    return load_split(SyntheticData(root=world_root, **SMALL_WORLD), "test")


def world_overrides(world_root: str) -> list[str]:
    return [f"root={world_root}", *[f"{k}={v}" for k, v in SMALL_WORLD.items()]]


# ----------------------------------------------------------------------------- a known classifier


class ColourCodedClassifier:
    """Predicts the class coded in an image's red channel (red = 40 * class), known tie-breaking.

    Features: 1 at the coded class, plus a small decreasing ramp, so that among a set of classes
    without the coded one the lowest-numbered class wins.
    """

    name = "colour-coded"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.encoded = 0
        self.class_calls: list[list[str]] = []

    @staticmethod
    def transform(image: Image.Image) -> torch.Tensor:
        return torch.tensor([image.getpixel((0, 0))[0] / 40.0])

    def _features(self, codes: torch.Tensor) -> torch.Tensor:
        ramp = 0.01 * torch.arange(self.num_classes, 0, -1, dtype=torch.float) / self.num_classes
        feats = ramp.repeat(len(codes), 1) + F.one_hot(codes, self.num_classes).float()
        return F.normalize(feats, dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += len(images)
        return self._features(images[:, 0].round().long())

    def class_features(self, classnames: list[str]) -> torch.Tensor:
        self.class_calls.append(list(classnames))
        # One-hot on the class's own index (its name is "class<i>"): independent of the other classes.
        idx = torch.tensor([int(c.removeprefix("class")) for c in classnames])
        return F.one_hot(idx, self.num_classes).float()


def colour_split(tmp_path: Path, pairs: list[tuple[int, int]], num_classes: int) -> Split:
    """A split of solid images: ``(true label, coded class)`` per sample."""
    samples = []
    for i, (label, code) in enumerate(pairs):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (4, 4), (40 * code, 0, 0)).save(path)
        samples.append(Sample(image=str(path), label=label, classname=f"class{label}", key=path.name))
    return Split(samples=samples, classnames=[f"class{i}" for i in range(num_classes)], name="test")


def test_known_classifier_gives_exact_base_novel_all(tmp_path):
    # 5 classes: base 0,1,2 ; novel 3,4.
    pairs = [
        (0, 0), (1, 1), (1, 3), (2, 0), (0, 4),  # base: right, right, wrong (->0), wrong, right (4 -> 0)
        (3, 3), (4, 4), (4, 0), (3, 1),          # novel: right, right, wrong (0 -> 3), right (1 -> 3)
    ]  # fmt: skip
    clf = ColourCodedClassifier(5)
    assert isinstance(clf, ImageTextClassifier)
    r = evaluate_base_novel(clf, colour_split(tmp_path, pairs, 5), batch_size=4)
    assert r["base"] == pytest.approx(100 * 3 / 5)
    assert r["novel"] == pytest.approx(100 * 3 / 4)
    assert r["all"] == pytest.approx(100 * 4 / 9)  # only the images coded with their own label
    assert r["hm"] == pytest.approx(2 * 60 * 75 / (60 + 75))
    assert (r["n_base"], r["n_novel"], r["n_all"]) == (5, 4, 9)
    assert (r["num_base_classes"], r["num_novel_classes"]) == (3, 2)
    assert r["model"] == "colour-coded"
    # Every image and every class is encoded exactly once.
    assert clf.encoded == 9
    assert clf.class_calls == [[f"class{i}" for i in range(5)]]


def test_empty_split_and_a_single_class(tmp_path):
    r = evaluate_base_novel(ColourCodedClassifier(2), Split(samples=[], classnames=["class0", "class1"]))
    assert (r["base"], r["novel"], r["all"], r["hm"], r["n_all"]) == (0.0, 0.0, 0.0, 0.0, 0)
    one = evaluate_base_novel(ColourCodedClassifier(1), colour_split(tmp_path, [(0, 0)], 1))
    assert (one["base"], one["novel"], one["hm"], one["num_novel_classes"]) == (100.0, 0.0, 0.0, 0)


def test_corrupt_image_names_the_file(tmp_path):
    split = colour_split(tmp_path, [(0, 0), (1, 1)], 2)
    Path(split.samples[1].image).write_bytes(b"not an image")
    with pytest.raises(KdpromptError, match=r"img1\.png"):
        evaluate_base_novel(ColourCodedClassifier(2), split)


def test_evaluation_table_rows():
    row = {"model": "m", "base": 50.0, "novel": 25.0, "hm": harmonic_mean(50.0, 25.0), "all": 30.0}
    table = evaluation_table([row]).splitlines()
    assert table[0] == "| model | base | novel | HM | all |"
    assert table[2] == "| m | 50.00 | 25.00 | 33.33 | 30.00 |"


# ------------------------------------------------------------------------------- zero-shot CLIP


def test_zero_shot_matches_brute_force_per_subset(test_split):
    clip = create_clip(ModelSpec(name="kd-tiny-teacher"))
    clf = ZeroShotClassifier(clip, templates="simple")
    assert isinstance(clf, ImageTextClassifier)
    assert clf.name == "zero-shot kd-tiny-teacher"
    r = evaluate_base_novel(clf, test_split, batch_size=16)

    def brute(split: Split) -> float:
        return zero_shot_accuracy(clip.model, clip.tokenizer, clip.preprocess_val, split, batch_size=16)

    base, novel = subsample_classes(test_split, "base"), subsample_classes(test_split, "novel")
    assert r["base"] == pytest.approx(brute(base))
    assert r["novel"] == pytest.approx(brute(novel))
    assert r["all"] == pytest.approx(brute(test_split))
    assert r["hm"] == pytest.approx(harmonic_mean(r["base"], r["novel"]))
    assert (r["n_base"], r["n_novel"], r["n_all"]) == (len(base), len(novel), len(test_split))
    n = len(test_split.classnames)
    assert (r["num_base_classes"], r["num_novel_classes"]) == ((n + 1) // 2, n // 2)
    assert r["split"] == "test"


def test_unknown_template_set():
    with pytest.raises(KdpromptError, match="ensemble"):
        ZeroShotClassifier(create_clip(ModelSpec(name="kd-tiny-student")), templates="fancy")


# ------------------------------------------------------------------------------------------ CLI


def invoke(*args: object):
    return CliRunner().invoke(eval_command, [str(a) for a in args])


def test_parse_zero_shot():
    assert parse_zero_shot("kd-tiny-teacher") == ("kd-tiny-teacher", None)
    assert parse_zero_shot("ViT-B-32@openai") == ("ViT-B-32", "openai")
    assert parse_zero_shot("m@dir/w.safetensors") == ("m", "dir/w.safetensors")
    with pytest.raises(KdpromptError):
        parse_zero_shot("@x.safetensors")


def test_cli_zero_shot_writes_metrics_and_prints_table(tmp_path, world_root, test_split):
    weights = save_clip_weights(
        create_clip(ModelSpec(name="kd-tiny-teacher")).model, tmp_path / "w.safetensors"
    )
    out = tmp_path / "eval"
    result = invoke(
        "--zero-shot", f"kd-tiny-teacher@{weights}", "--zero-shot", "kd-tiny-student",
        "--data", "synthetic", *world_overrides(world_root),
        "--out", out, "--batch-size", 16, "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| model | base | novel | HM | all |" in result.output
    assert "| zero-shot kd-tiny-teacher@w.safetensors |" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["model"] for m in metrics] == [
        "zero-shot kd-tiny-teacher@w.safetensors",
        "zero-shot kd-tiny-student",
    ]
    for m in metrics:
        assert {"base", "novel", "all", "hm", "n_base", "n_novel", "n_all"} <= set(m)
        assert (m["data_source"], m["split"], m["n_all"]) == ("synthetic", "test", len(test_split))
    assert (out / "metrics.md").read_text().startswith("| model | base | novel | HM | all |")
    # The weights after '@' were loaded: the same numbers as evaluating that file directly.
    clip = create_clip(ModelSpec(name="kd-tiny-teacher", pretrained=str(weights)))
    direct = evaluate_base_novel(ZeroShotClassifier(clip), test_split)
    assert {k: metrics[0][k] for k in ("base", "novel", "all")} == pytest.approx(
        {k: direct[k] for k in ("base", "novel", "all")}
    )


def test_cli_requires_a_model(tmp_path):
    result = invoke("--data", "synthetic", "--out", tmp_path / "e")
    assert result.exit_code == 2
    assert "--zero-shot" in result.output and "--teacher" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


def test_cli_requires_data(tmp_path):
    result = invoke("--zero-shot", "kd-tiny-student", "--out", tmp_path / "e")
    assert result.exit_code == 2
    assert "give --data" in result.output


def test_cli_bad_data_override(tmp_path, world_root):
    result = invoke(
        "--zero-shot", "kd-tiny-student", "--data", "synthetic", f"root={world_root}", "colour=blue",
        "--out", tmp_path / "e",
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.startswith("error:") and "colour" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


def test_cli_unknown_model(tmp_path, world_root):
    result = invoke("--zero-shot", "no-such-model", "--data", "synthetic", *world_overrides(world_root))
    assert result.exit_code == 2
    assert "unknown model 'no-such-model'" in result.output


def test_registered_as_kdprompt_eval(cli):
    result = cli("eval", "--help")
    assert result.exit_code == 0
    assert "--zero-shot MODEL[@PRETRAINED]" in result.output and "Examples:" in result.output


def test_cli_coop_templates_take_the_dataset_of_the_data(tmp_path, world_root):
    from fixtures_coop import make_dtd

    from kdprompt.cli.evaluation import TEMPLATE_CHOICES
    from kdprompt.data.coop import CoopData
    from kdprompt.models.templates import TEMPLATE_SET_NAMES

    assert TEMPLATE_CHOICES == TEMPLATE_SET_NAMES
    root = make_dtd(tmp_path / "coop")
    weights = save_clip_weights(
        create_clip(ModelSpec(name="kd-tiny-student")).model, tmp_path / "w.safetensors"
    )
    out = tmp_path / "eval"
    result = invoke(
        "--zero-shot", f"kd-tiny-student@{weights}", "--data", "coop", f"root={root}", "dataset=dtd",
        "--templates", "coop", "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [row] = json.loads((out / "metrics.json").read_text())
    assert (row["templates"], row["data"]["dataset"]) == ("coop", "dtd")
    # CoOp's DTD template (trainers/zsclip.py): the same numbers as "{} texture." given by hand.
    clip = create_clip(ModelSpec(name="kd-tiny-student", pretrained=str(weights)))
    test = load_split(CoopData(root=root, dataset="dtd"), "test")
    direct = evaluate_base_novel(ZeroShotClassifier(clip, templates=["{} texture."]), test)
    assert {k: row[k] for k in ("base", "novel", "all")} == pytest.approx(
        {k: direct[k] for k in ("base", "novel", "all")}
    )

    wrong = invoke("--zero-shot", "kd-tiny-student", "--data", "synthetic", *world_overrides(world_root),
                   "--templates", "coop", "--out", tmp_path / "e")  # fmt: skip
    assert wrong.exit_code == 2 and "need coop data" in wrong.output
    assert not (tmp_path / "e").exists()
