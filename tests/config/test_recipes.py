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


def test_fingerprint_tells_models_and_methods_apart_but_not_logging():
    from kdprompt.config.fingerprint import recipe_fingerprint
    from kdprompt.config.teacher import TeacherRecipe

    teacher = recipe_fingerprint(load_recipe(PretrainRecipe, "demo/pretrain-teacher"))
    student = recipe_fingerprint(load_recipe(PretrainRecipe, "demo/pretrain-student"))
    assert teacher != student  # the two differ only in model.name (and where they write)
    renamed = load_recipe(
        PretrainRecipe, "demo/pretrain-teacher", ["name=x", "train.log_every=3", "output_dir=/y"]
    )
    assert recipe_fingerprint(renamed) == teacher
    src = load_recipe(TeacherRecipe, "demo/teacher-promptsrc")
    other_seed = load_recipe(TeacherRecipe, "demo/teacher-promptsrc", ["seed=2"])
    assert recipe_fingerprint(src) != recipe_fingerprint(other_seed)


@pytest.mark.parametrize(
    "name", sorted(n for n in builtin_recipes() if n.startswith(("base2novel/", "cross_dataset/")))
)
def test_coop_recipes_train_like_the_references(name):
    # The CoOp-family references (Dassl) crop at scale 0.08-1 with flips and step a cosine per epoch.
    kind = read_recipe_yaml(builtin_recipes()[name])["recipe"]
    recipe = load_recipe(RECIPE_MODELS[kind], name)
    assert recipe.augmentation.preset == "dassl" and recipe.train.lr_schedule == "dassl"


@pytest.mark.parametrize("name", sorted(n for n in builtin_recipes() if n.startswith(("demo/", "compact/"))))
def test_other_recipes_keep_kdprompts_defaults(name):
    recipe = read_recipe_yaml(builtin_recipes()[name])
    assert "augmentation" not in recipe and "lr_schedule" not in recipe.get("train", {})


def test_base2novel_teachers_use_the_references_templates():
    from kdprompt.config.teacher import TeacherRecipe

    names = [n for n in builtin_recipes() if n.startswith("base2novel/") and "/distill-" not in n]
    assert len(names) == 33
    for name in names:
        recipe = load_recipe(TeacherRecipe, name)
        # The zero-shot row is CoOp's per-dataset template; PromptSRC's ensemble is its own 60.
        assert recipe.zero_shot_templates == "coop", name
        if recipe.method.name == "promptsrc":
            assert recipe.method.templates == "promptsrc", name
    for name in ("demo/teacher-promptsrc", "demo/teacher-maple"):
        recipe = load_recipe(TeacherRecipe, name)
        assert recipe.zero_shot_templates == "simple"
    assert load_recipe(TeacherRecipe, "demo/teacher-promptsrc").method.templates == "ensemble"


def test_coop_templates_need_coop_data():
    from kdprompt.config.teacher import TeacherRecipe

    with pytest.raises(KdpromptError) as err:
        load_recipe(TeacherRecipe, "demo/teacher-promptsrc", ["zero_shot_templates=coop"])
    assert "zero_shot_templates" in str(err.value) and "coop data" in str(err.value)
    with pytest.raises(KdpromptError) as err:
        load_recipe(PretrainRecipe, "demo/pretrain-teacher", ["eval.0.templates=coop"])
    assert "eval[0].templates" in str(err.value)


@pytest.mark.parametrize("bad", ["../x", "/abs", "", "a/b", "..", "."])
def test_run_name_must_be_one_folder_name(bad):
    with pytest.raises(KdpromptError) as err:
        load_recipe(PretrainRecipe, "demo/pretrain-teacher", [f"name={bad}"])
    assert "name: Value error, the run name must be one folder name" in str(err.value)
    assert repr(bad) in str(err.value)


def test_non_utf8_recipe_is_one_clear_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(KdpromptError, match=r"is not UTF-8 text .*save it as UTF-8"):
        load_recipe(PretrainRecipe, str(bad))


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # ~600 bytes, 10^9 values once expanded
    assert bomb.stat().st_size < 1000
    with pytest.raises(KdpromptError, match="expands to more than 100,000 values"):
        load_recipe(PretrainRecipe, str(bomb))


@pytest.mark.parametrize("value", ["1e309", ".nan", "-.inf"])
def test_infinite_or_nan_numbers_are_refused(value):
    """1e309 parses to inf, which a ge=0 bound lets through: a weight of inf is a typo, not a setting."""
    with pytest.raises(KdpromptError, match=r"objectives\.kl\.weight: Input should be a finite number"):
        load_recipe(RECIPE_MODELS["distill"], "demo/distill-student", [f"objectives.kl.weight={value}"])


def test_unicode_digit_list_index_and_huge_numbers_are_clear_errors(tmp_path):
    with pytest.raises(KdpromptError, match="use an index"):
        apply_overrides({"eval": [{"split": "test"}]}, ["eval.².split=val"])
    # PyYAML raises ValueError (not a YAMLError) on an int of thousands of digits.
    assert apply_overrides({}, ["seed=" + "9" * 5000])["seed"] == "9" * 5000
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: " + "9" * 5000 + "\n")
    with pytest.raises(KdpromptError, match=r"cannot read.*quote it"):
        read_recipe_yaml(recipe)
