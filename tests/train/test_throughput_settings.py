"""Throughput settings of a train section (pin_memory, allow_tf32, channels_last, compile): validated,
left out of the recipe fingerprint, and applied by the run scaffold on CPU (compile is wired, not run)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from kdprompt.config.base import StrictModel
from kdprompt.config.common import CheckpointConfig, LoopConfig, Resume
from kdprompt.config.distill import DistillRecipe
from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.config.loading import load_recipe
from kdprompt.errors import KdpromptError
from kdprompt.train.run import Run, Stage, open_run
from kdprompt.train.runtime import apply_throughput_settings, resolve_pin_memory

DISTILL = "base2novel/oxford_pets/distill-vit-b-16"


def test_defaults_and_overrides_validate():
    train = load_recipe(DistillRecipe, DISTILL).train
    assert (train.pin_memory, train.allow_tf32, train.channels_last, train.compile) == (
        "auto",
        True,
        False,
        False,
    )
    overridden = load_recipe(
        DistillRecipe,
        DISTILL,
        [
            "train.pin_memory=false",
            "train.allow_tf32=false",
            "train.channels_last=true",
            "train.compile=true",
        ],
    ).train
    assert (overridden.pin_memory, overridden.allow_tf32, overridden.channels_last, overridden.compile) == (
        False,
        False,
        True,
        True,
    )


@pytest.mark.parametrize(
    "override", ["train.pin_memory=sometimes", "train.compile=fast", "train.channels_lst=true"]
)
def test_bad_values_are_one_clear_error(override):
    with pytest.raises(KdpromptError) as err:
        load_recipe(DistillRecipe, DISTILL, [override])
    assert override.split("=")[0].removeprefix("train.")[:8] in str(err.value)


def test_settings_leave_the_fingerprint_alone():
    # Resuming with compile switched on (or pinned memory off) must not be refused as another recipe.
    base = recipe_fingerprint(load_recipe(DistillRecipe, DISTILL))
    fast = load_recipe(DistillRecipe, DISTILL, ["train.compile=true", "train.channels_last=true"])
    assert recipe_fingerprint(fast) == base
    assert recipe_fingerprint(load_recipe(DistillRecipe, DISTILL, ["train.lr=0.1"])) != base


def test_pin_memory_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not resolve_pin_memory("auto") and not resolve_pin_memory(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_pin_memory("auto") and resolve_pin_memory(True) and not resolve_pin_memory(False)


def test_apply_on_cpu_converts_and_flags_without_compiling():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    applied = apply_throughput_settings(
        model, LoopConfig(channels_last=True, compile=True, allow_tf32=True), torch.device("cpu")
    )
    # TF32 is a CUDA switch: not applied on CPU.
    assert applied == {"allow_tf32": False, "channels_last": True, "compile": True}
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model._compiled_call_impl is not None  # compiled on the first call, which this test never makes
    plain = nn.Conv2d(3, 8, 3)
    assert apply_throughput_settings(plain, LoopConfig(), torch.device("cpu")) == dict.fromkeys(
        applied, False
    )
    assert plain._compiled_call_impl is None and not plain.weight.is_contiguous(
        memory_format=torch.channels_last
    )


class _Train(LoopConfig):
    lr: float = 0.1


class _Recipe(StrictModel):
    recipe: Literal["conv"] = "conv"
    name: str = "conv"
    seed: int = 0
    output_dir: Path
    resume: Resume | Path = "never"
    train: _Train
    checkpoint: CheckpointConfig = CheckpointConfig()


class _ConvStage(Stage):
    name = "conv"

    def run_dir(self) -> Path:
        return Path(self.recipe.output_dir) / "conv"

    def setup(self, run: Run) -> None:
        self.model = nn.Conv2d(3, 4, 3)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.recipe.train.lr)
        self.counters = {}
        run.per_epoch = run.total_steps = 1


def test_the_run_scaffold_applies_them(tmp_path):
    train = _Train(mixed_precision="no", channels_last=True, compile=True)
    stage = _ConvStage(_Recipe(output_dir=tmp_path, train=train))
    open_run(stage, resume=False, tensorboard=False)
    assert stage.model.weight.is_contiguous(memory_format=torch.channels_last)
    assert stage.model._compiled_call_impl is not None
