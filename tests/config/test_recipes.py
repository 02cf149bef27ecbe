"""Recipes: every built-in validates; bad keys and values give one message naming field, value, choices."""

from __future__ import annotations

import pytest

from kdprompt.config.loading import builtin_recipes, find_recipe, load_recipe, read_recipe_yaml
from kdprompt.config.overrides import apply_overrides
from kdprompt.config.pretrain import PretrainRecipe
from kdprompt.config.recipes import RECIPE_MODELS
from kdprompt.errors import KdpromptError


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_validates(name):
    kind = read_recipe_yaml(builtin_recipes()[name]).get("recipe")
    assert kind in RECIPE_MODELS, f"{name}: unknown recipe kind {kind!r}"
    recipe = load_recipe(RECIPE_MODELS[kind], name)
    assert recipe.name and recipe.description


def test_there_are_builtin_demo_recipes():
    assert {"demo/pretrain-teacher", "demo/pretrain-student"} <= set(builtin_recipes())


def test_override_sets_nested_values_and_list_items():
    recipe = load_recipe(
        PretrainRecipe,
        "demo/pretrain-teacher",
        ["train.batch_size=7", "model.pretrained=/x/w.safetensors", "eval.1.split=val", "data.seed=3"],
    )
    assert recipe.train.batch_size == 7
    assert recipe.model.pretrained == "/x/w.safetensors"
    assert recipe.eval[1].split == "val"
    assert recipe.data.seed == 3


def test_misspelled_key_names_field_and_allowed_keys():
    with pytest.raises(KdpromptError) as err:
        load_recipe(PretrainRecipe, "demo/pretrain-teacher", ["train.batchsize=3"])
    msg = str(err.value)
    assert "train.batchsize" in msg
    assert "did you mean 'batch_size'" in msg
    assert "allowed keys here:" in msg and "epochs" in msg


def test_misspelled_key_inside_a_union_member():
    with pytest.raises(KdpromptError) as err:
        load_recipe(PretrainRecipe, "demo/pretrain-teacher", ["data.sede=3"])
    msg = str(err.value)
    assert "data.sede" in msg and "'seed'" in msg and "domain" in msg


def test_bad_value_names_field_value_and_choices():
    with pytest.raises(KdpromptError) as err:
        load_recipe(PretrainRecipe, "demo/pretrain-teacher", ["train.mixed_precision=fp8"])
    msg = str(err.value)
    assert "train.mixed_precision" in msg and "'fp8'" in msg
    for choice in ("auto", "no", "bf16", "fp16"):
        assert choice in msg


def test_bad_source_tag_lists_sources():
    with pytest.raises(KdpromptError) as err:
        load_recipe(PretrainRecipe, "demo/pretrain-teacher", ["data.source=imagefolder"])
    msg = str(err.value)
    assert "data.source" in msg and "imagefolder" in msg
    for source in ("folder", "coop", "shards", "synthetic"):
        assert source in msg


def test_negative_number_is_rejected_with_bound():
    with pytest.raises(KdpromptError, match=r"train.batch_size: Input should be greater than or equal to 1"):
        load_recipe(PretrainRecipe, "demo/pretrain-teacher", ["train.batch_size=0"])


@pytest.mark.parametrize("bad", ["train.batch_size", "=3", "train..x=1"])
def test_malformed_override(bad):
    with pytest.raises(KdpromptError, match="Command-line overrides must be in the form of key=value"):
        apply_overrides({}, [bad])


def test_override_cannot_descend_into_a_value():
    with pytest.raises(KdpromptError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(KdpromptError) as err:
        find_recipe("demo/pretrain-teachr")
    assert "demo/pretrain-teacher" in str(err.value) and "kdprompt recipes" in str(err.value)


def test_recipe_file_path_and_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(KdpromptError, match="not valid YAML"):
        load_recipe(PretrainRecipe, str(bad))
    with pytest.raises(KdpromptError, match="recipe file not found"):
        load_recipe(PretrainRecipe, str(tmp_path / "missing.yaml"))
