"""Training checkpoints (kdprompt.train.checkpoint): atomic directories, rotation, resume choices, RNG."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from kdprompt.errors import KdpromptError
from kdprompt.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_on_resume,
    resume_training,
    rng_state,
    save_checkpoint,
    save_training_checkpoint,
    set_rng_state,
)


def save(directory, step, keep_last=2, fingerprint="f" * 16, **meta):
    weights = {"w": torch.full((2, 3), float(step)), "b": torch.arange(3.0)}
    state = {"counters": {"seen": step}, "optimizer": {"state": {}, "param_groups": []}}
    return save_checkpoint(
        directory, step, weights, state, {"recipe_fingerprint": fingerprint, **meta}, keep_last
    )


def test_save_and_load_round_trip(tmp_path):
    path = save(tmp_path, 7, epoch_end=True)
    assert path == tmp_path / "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "state.pt", "weights.safetensors"]
    ckpt = load_checkpoint(path)
    assert ckpt.step == 7 and ckpt.path == path
    assert list(ckpt.meta) == ["step", "recipe_fingerprint", "epoch_end"]
    assert torch.equal(ckpt.weights["w"], torch.full((2, 3), 7.0))
    assert ckpt.state["counters"] == {"seen": 7}


def test_shared_and_strided_tensors_are_saved_as_copies(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    path = save_checkpoint(tmp_path, 1, {"a": base, "t": base.T, "row": base[1]}, {}, keep_last=1)
    weights = load_checkpoint(path).weights
    assert torch.equal(weights["t"], base.T) and torch.equal(weights["row"], base[1])


def test_only_the_newest_keep_last_remain(tmp_path):
    for step in (1, 2, 3, 10, 11):
        save(tmp_path, step, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000010", "step-00000011"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000011"


def test_a_checkpoint_saved_again_replaces_the_old_one(tmp_path):
    save(tmp_path, 4)
    save_checkpoint(tmp_path, 4, {"w": torch.zeros(1)}, {}, {"again": True})
    ckpt = load_checkpoint(tmp_path / "step-00000004")
    assert ckpt.meta["again"] is True and list(ckpt.weights) == ["w"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"]  # no temporaries left


def test_incomplete_checkpoints_and_other_names_are_ignored(tmp_path):
    save(tmp_path, 2)
    (tmp_path / "step-00000009").mkdir()  # no meta.json: a crash mid-write
    (tmp_path / "step-9").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(KdpromptError, match="not a complete kdprompt checkpoint"):
        load_checkpoint(tmp_path / "step-00000009")


def test_resolve_resume_auto_never_and_a_path(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    save(tmp_path, 2)
    save(tmp_path, 4)
    assert resolve_resume("auto", tmp_path) == tmp_path / "step-00000004"
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(tmp_path / "step-00000002", tmp_path) == tmp_path / "step-00000002"
    with pytest.raises(
        KdpromptError, match=r"not found or incomplete; available: \['step-00000002', 'step-00000004'\]"
    ):
        resolve_resume(tmp_path / "step-00000003", tmp_path)


def test_resolve_resume_refuses_another_recipe(tmp_path):
    save(tmp_path, 2, fingerprint="a" * 16)
    assert resolve_resume("auto", tmp_path, "a" * 16) == tmp_path / "step-00000002"
    with pytest.raises(KdpromptError, match="written by a different recipe") as err:
        resolve_resume("auto", tmp_path, "b" * 16)
    assert "a" * 16 in str(err.value) and "b" * 16 in str(err.value) and "resume=never" in str(err.value)
    assert resolve_resume("never", tmp_path, "b" * 16) is None
    # A checkpoint without a fingerprint (older runs) is not refused.
    meta = tmp_path / "step-00000002" / "meta.json"
    meta.write_text(json.dumps({"step": 2}))
    assert resolve_resume("auto", tmp_path, "b" * 16) == tmp_path / "step-00000002"


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), torch.rand(3))
    random.random(), torch.rand(5)
    set_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_restore_rng_on_resume_main_restores_others_reseed():
    state = rng_state()
    expected = torch.rand(4)
    restore_rng_on_resume(state, True, seed=5)
    assert torch.equal(torch.rand(4), expected)
    restore_rng_on_resume(state, False, seed=5)
    reseeded = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(reseeded, torch.rand(4))


class FakeAccelerator:
    """The two things save_training_checkpoint uses: barriers and the main-process flag."""

    def __init__(self, main: bool) -> None:
        self.is_main_process = main
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1


def test_training_checkpoint_holds_optimizer_counters_and_rng_and_resumes(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    accelerator = FakeAccelerator(main=True)
    save_training_checkpoint(
        accelerator, tmp_path, 3, model.state_dict, optimizer, {"seen": 12}, {"recipe_fingerprint": "x"}, 2
    )
    assert accelerator.barriers == 2
    ckpt = load_checkpoint(tmp_path / "step-00000003")
    assert set(ckpt.state) == {"optimizer", "counters", "rng"} and ckpt.state["counters"] == {"seen": 12}

    fresh = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.5, momentum=0.9)
    resumed = resume_training("auto", tmp_path, "x", fresh, main=False)
    assert resumed is not None and resumed.step == 3
    assert fresh.param_groups[0]["lr"] == 0.1
    momentum = next(iter(fresh.state.values()))["momentum_buffer"]
    assert torch.equal(momentum, next(iter(optimizer.state.values()))["momentum_buffer"])
    assert resume_training("never", tmp_path, "x", fresh) is None
    with pytest.raises(KdpromptError, match="different recipe"):
        resume_training("auto", tmp_path, "y", fresh)


def test_only_the_main_process_writes(tmp_path):
    accelerator = FakeAccelerator(main=False)
    called = SimpleNamespace(n=0)

    def tensors():
        called.n += 1
        return {}

    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    save_training_checkpoint(accelerator, tmp_path, 1, tensors, optimizer, {}, {}, 2)
    assert accelerator.barriers == 2 and called.n == 0 and list_checkpoints(tmp_path) == []
