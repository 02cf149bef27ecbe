"""`kdprompt export` of a CLIP run SIGKILLed between its phases: the old bundle survives, a rerun is whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_artefact_faults import EXPORT_POINTS, bundle_content, kdprompt_killed_at

from kdprompt.deploy.export_clip import export_run
from kdprompt.models import ModelSpec, create_clip, save_clip_weights

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> dict:
    """A finished pre-training run (as `kdprompt pretrain` leaves it), a class file, and two exports of it."""
    root = tmp_path_factory.mktemp("clip-run")
    run = root / "runs" / "p" / "pretrain"
    run.mkdir(parents=True)
    recipe = {"recipe": "pretrain", "name": "p", "model": {"name": "kd-tiny-student"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    torch.manual_seed(2)
    save_clip_weights(create_clip(ModelSpec(name="kd-tiny-student")).model, run / "model.safetensors")
    classes = root / "classes.txt"
    classes.write_text("red_circle\nblue square\n", encoding="utf-8")
    old, new = root / "old", root / "new"
    export_run(run, old, classes=classes, templates="simple")
    export_run(run, new, classes=classes, templates="ensemble")
    return {"run": run, "classes": classes, "old": old, "new": bundle_content(new)}


@pytest.mark.parametrize("point", [*EXPORT_POINTS, "cache.written"])
def test_a_killed_clip_export_keeps_the_old_bundle_and_a_rerun_is_whole(clip_run, point, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(clip_run["old"], out)
    old = bundle_content(out)
    args = ["export", clip_run["run"], out, "--classes", clip_run["classes"], "--templates", "ensemble"]
    kdprompt_killed_at(point, *args, "--overwrite")
    assert bundle_content(out) == old  # (a swap killed half-way is put back when the bundle is opened)
    export_run(clip_run["run"], out, classes=clip_run["classes"], templates="ensemble", overwrite=True)
    assert bundle_content(out) == clip_run["new"]


def test_a_killed_first_clip_export_leaves_nothing(clip_run, tmp_path: Path):
    out = tmp_path / "bundle"
    args = ["export", clip_run["run"], out, "--classes", clip_run["classes"]]
    kdprompt_killed_at("export.manifest_written", *args)
    assert not out.exists()
