"""Class names as prompt text and the template sets: one spelling for teacher, ensembles, zero-shot, cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kdprompt.data.classnames import prompt_classname
from kdprompt.data.coop import COOP_DATASETS, CoopData
from kdprompt.data.synthetic import SyntheticData
from kdprompt.errors import KdpromptError
from kdprompt.evaluate import ZeroShotClassifier
from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.prompt_methods import PromptSRCConfig
from kdprompt.models.teacher import TEACHER_FILE, PromptedClip, load_teacher, save_teacher
from kdprompt.models.templates import (
    COOP_TEMPLATES,
    PROMPTSRC_TEMPLATES,
    TEMPLATE_SET_NAMES,
    TEMPLATE_SETS,
    TemplateSet,
    template_set,
    text_classifier,
)
from kdprompt.text_features import load_cache

NAMES = ["american_bulldog", "Apply_Eye_Makeup"]
READABLE = ["american bulldog", "Apply Eye Makeup"]


class Spy:
    """A tokenizer that records every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, texts):
        self.seen.extend(texts)
        return self.tokenizer(texts)


def tiny_clip():
    torch.manual_seed(0)
    return create_clip(ModelSpec(name="kd-tiny-teacher"))


def test_prompt_classname():
    assert [prompt_classname(n) for n in NAMES] == READABLE
    assert prompt_classname("apple_pie", "verbatim") == "apple_pie"
    assert prompt_classname("golden retriever") == "golden retriever"


def test_template_sets():
    assert TEMPLATE_SET_NAMES == ("simple", "ensemble", "promptsrc", "coop")
    assert len(TEMPLATE_SETS["ensemble"].templates) == 80
    # PromptSRC's list is 60 distinct templates taken from the 80.
    assert len(set(PROMPTSRC_TEMPLATES)) == 60
    assert set(PROMPTSRC_TEMPLATES) <= set(TEMPLATE_SETS["ensemble"].templates)
    assert template_set("promptsrc").average == "raw" and template_set("ensemble").average == "normalised"
    assert set(COOP_TEMPLATES) == set(COOP_DATASETS)
    pets = template_set("coop", CoopData(root="x", dataset="oxford_pets"))
    assert pets == TemplateSet(("a photo of a {}, a type of pet.",))
    assert pets.prompts(NAMES[:1]) == ["a photo of a american bulldog, a type of pet."]
    assert template_set("coop", CoopData(root="x", dataset="ucf101")).prompts(NAMES[1:]) == [
        "a photo of a person doing Apply Eye Makeup."
    ]
    with pytest.raises(KdpromptError, match="coop data"):
        template_set("coop", SyntheticData())
    with pytest.raises(KdpromptError, match="coop data"):
        template_set("coop")
    with pytest.raises(KdpromptError, match="promptsrc"):
        template_set("fancy")


@pytest.mark.parametrize("name", ["promptsrc", "ensemble"])
def test_text_classifier_averaging_matches_an_independent_computation(name):
    clip = tiny_clip()
    tset = template_set(name)
    with torch.no_grad():
        got = text_classifier(clip.model.encode_text, clip.tokenizer, NAMES, tset, batch_size=7)
        expected = []
        for readable in READABLE:
            raw = clip.model.encode_text(clip.tokenizer([t.replace("{}", readable) for t in tset.templates]))
            # PromptSRC (trainers/promptsrc.py) averages raw features; open_clip averages unit ones.
            per = raw if tset.average == "raw" else F.normalize(raw, dim=-1)
            expected.append(F.normalize(per.mean(dim=0), dim=-1))
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-5)


def test_raw_and_normalised_averages_differ():
    clip = tiny_clip()
    raw = text_classifier(clip.model.encode_text, clip.tokenizer, NAMES, template_set("promptsrc"))
    unit = TemplateSet(PROMPTSRC_TEMPLATES)
    norm = text_classifier(clip.model.encode_text, clip.tokenizer, NAMES, unit)
    assert not torch.allclose(raw, norm, atol=1e-6)


def test_teacher_prompts_and_frozen_ensemble_use_spaces():
    clip = tiny_clip()
    model = PromptedClip(clip, PromptSRCConfig(text_depth=2, vision_depth=2, templates="promptsrc"))
    assert model.class_prompts(NAMES) == [f"a photo of a {r}." for r in READABLE]
    assert torch.equal(model.class_tokens(NAMES), clip.tokenizer([f"a photo of a {r}." for r in READABLE]))
    # "_" is a token of its own in open_clip's tokenizer: the underscored prompt would differ.
    assert not torch.equal(model.class_tokens(NAMES[:1]), clip.tokenizer(["a photo of a american_bulldog."]))

    spy = model.tokenizer = Spy(clip.tokenizer)
    model.learner.prepare_training(model, NAMES)
    assert len(spy.seen) == 2 * 60
    assert all("_" not in text for text in spy.seen) and "a photo of a american bulldog." in spy.seen


def test_zero_shot_classifier_uses_spaces_and_coop_templates():
    clip = tiny_clip()
    clf = ZeroShotClassifier(clip, templates="coop", data=CoopData(root="x", dataset="oxford_pets"))
    spy = clf.tokenizer = Spy(clip.tokenizer)
    clf.class_features(NAMES)
    assert spy.seen == [
        "a photo of a american bulldog, a type of pet.",
        "a photo of a Apply Eye Makeup, a type of pet.",
    ]
    with pytest.raises(KdpromptError, match="coop data"):
        ZeroShotClassifier(clip, templates="coop")


def test_cache_cli_records_prompts_and_old_teachers_keep_names_verbatim(cli, tmp_path, tiny_teacher_weights):
    clip = create_clip(ModelSpec(name="kd-tiny-teacher", pretrained=tiny_teacher_weights))
    teacher_dir = tmp_path / "runs" / "t" / "teacher"
    model = PromptedClip(clip, PromptSRCConfig(text_depth=2, vision_depth=2))
    save_teacher(teacher_dir, model, classnames=NAMES, all_classnames=NAMES, extra={})
    meta = json.loads((teacher_dir / TEACHER_FILE).read_text())
    assert (meta["prompt_template"], meta["classname_form"]) == ("a photo of a {}.", "spaces")

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    made = cli("cache", teacher_dir, "--classes", classes, "--out", tmp_path / "cache")
    assert made.exit_code == 0, made.output
    cache = load_cache(
        tmp_path / "cache", expect_classnames=NAMES
    )  # names stay as given: they identify classes
    assert cache.manifest["prompts"] == [f"a photo of a {r}." for r in READABLE]
    teacher = load_teacher(teacher_dir)
    with torch.no_grad():
        direct = teacher.text_features(clip.tokenizer(cache.manifest["prompts"]))
    torch.testing.assert_close(cache.features, direct, rtol=0, atol=1e-5)
    assert cache.subset(NAMES[::-1]).manifest["prompts"] == cache.manifest["prompts"][::-1]

    # A teacher.json from before kdprompt recorded the form was trained on the names as given.
    del meta["classname_form"]
    (teacher_dir / TEACHER_FILE).write_text(json.dumps(meta))
    assert load_teacher(teacher_dir).class_prompts(NAMES[:1]) == ["a photo of a american_bulldog."]
    meta["classname_form"] = "shouting"
    (teacher_dir / TEACHER_FILE).write_text(json.dumps(meta))
    with pytest.raises(KdpromptError, match="classname_form"):
        load_teacher(teacher_dir)
