"""Training checkpoints (kdprompt.train.checkpoint): atomic directories, rotation, resume choices, RNG."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from kdprompt.errors import KdpromptError
from kdprompt.train.checkpoint import (
    clean_stale_temporaries,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_resume_checkpoint,
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
    assert list(ckpt.meta) == ["step", "recipe_fingerprint", "epoch_end", "sha256"]
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


def resume_path(resume, directory, fingerprint=None):
    ckpt = load_resume_checkpoint(resume, directory, fingerprint)
    return None if ckpt is None else ckpt.path


def test_resume_auto_never_and_a_path(tmp_path):
    assert resume_path("auto", tmp_path) is None
    save(tmp_path, 2)
    save(tmp_path, 4)
    assert resume_path("auto", tmp_path) == tmp_path / "step-00000004"
    assert resume_path("never", tmp_path) is None
    assert resume_path(tmp_path / "step-00000002", tmp_path) == tmp_path / "step-00000002"
    with pytest.raises(
        KdpromptError, match=r"not found or incomplete; available: \['step-00000002', 'step-00000004'\]"
    ):
        resume_path(tmp_path / "step-00000003", tmp_path)


def test_resume_refuses_another_recipe(tmp_path, capsys):
    save(tmp_path, 2, fingerprint="a" * 16)
    assert resume_path("auto", tmp_path, "a" * 16) == tmp_path / "step-00000002"
    with pytest.raises(KdpromptError, match="written by a different recipe") as err:
        resume_path("auto", tmp_path, "b" * 16)
    assert "a" * 16 in str(err.value) and "b" * 16 in str(err.value) and "resume=never" in str(err.value)
    assert resume_path("never", tmp_path, "b" * 16) is None
    # A checkpoint without a fingerprint or checksums (older runs) is not refused, only noted.
    meta = tmp_path / "step-00000002" / "meta.json"
    meta.write_text(json.dumps({"step": 2}))
    capsys.readouterr()
    assert resume_path("auto", tmp_path, "b" * 16) == tmp_path / "step-00000002"
    assert "has no checksums" in capsys.readouterr().err


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


def flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


DAMAGES = {
    "torn weights": lambda c: (c / "weights.safetensors").write_bytes(
        (c / "weights.safetensors").read_bytes()[:100]
    ),
    "flipped weight byte": lambda c: flip_last_byte(c / "weights.safetensors"),
    "torn state": lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:50]),
    "missing weights": lambda c: (c / "weights.safetensors").unlink(),
    "empty meta": lambda c: (c / "meta.json").write_text(""),
    "invalid meta": lambda c: (c / "meta.json").write_text('{"step": 4,'),
    "meta without a step": lambda c: (c / "meta.json").write_text("[]"),
}
DAMAGED_FILE = {
    "torn weights": "weights.safetensors",
    "flipped weight byte": "weights.safetensors",
    "torn state": "state.pt",
    "missing weights": "weights.safetensors",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_under_auto_and_is_an_error_by_name(tmp_path, capsys, damage):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    DAMAGES[damage](newest)
    named = newest / DAMAGED_FILE.get(damage, "meta.json")

    ckpt = load_resume_checkpoint("auto", tmp_path, "f" * 16)
    assert ckpt is not None and ckpt.step == 2 and torch.equal(ckpt.weights["w"], torch.full((2, 3), 2.0))
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: skipping damaged checkpoint step-00000004") and str(named) in warning
    assert len(warning.splitlines()) == 1

    with pytest.raises(KdpromptError, match="is damaged") as err:
        load_resume_checkpoint(newest, tmp_path)
    assert str(named) in str(err.value) and "\n" not in str(err.value)
    assert not isinstance(err.value.__cause__, Exception)  # one clear error, no chained traceback


def test_a_flipped_weight_byte_is_caught_by_the_checksum_alone(tmp_path):
    path = save(tmp_path, 3)
    flip_last_byte(path / "weights.safetensors")
    # The file still parses: without the checksum the run would resume with a silently wrong weight.
    from safetensors.torch import load_file

    parsed = load_file(str(path / "weights.safetensors"))
    assert not (
        torch.equal(parsed["b"], torch.arange(3.0)) and torch.equal(parsed["w"], torch.full((2, 3), 3.0))
    )
    with pytest.raises(KdpromptError, match=r"does not match the sha256 in meta\.json"):
        load_checkpoint(path)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    for step in (2, 4):
        (save(tmp_path, step) / "meta.json").write_text("")
    with pytest.raises(KdpromptError, match=r"every checkpoint under .* is damaged") as err:
        load_resume_checkpoint("auto", tmp_path)
    assert "step-00000002" in str(err.value) and "resume=never" in str(err.value)


def test_an_old_checkpoint_without_checksums_still_has_torn_files_caught(tmp_path):
    path = save(tmp_path, 2)
    meta = json.loads((path / "meta.json").read_text())
    del meta["sha256"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(path).step == 2
    (path / "state.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(KdpromptError, match=r"state\.pt cannot be parsed"):
        load_checkpoint(path)


def test_rotation_ignores_checkpoints_after_the_step_saved(tmp_path, capsys):
    save(tmp_path, 2)
    (save(tmp_path, 4) / "meta.json").write_text("")  # damaged: the run resumes from step 2
    save(tmp_path, 3, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert load_resume_checkpoint("auto", tmp_path).step == 3
    save(tmp_path, 4, keep_last=1)  # the redone step replaces the damaged one
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]
    assert load_checkpoint(tmp_path / "step-00000004").step == 4


def test_stale_temporaries_are_removed_and_an_interrupted_swap_is_finished(tmp_path):
    save(tmp_path, 2)
    torn = tmp_path / ".step-00000004.k2j3h4_x.tmp"
    (torn / "step-00000004").mkdir(parents=True)
    (torn / "step-00000004" / "weights.safetensors").write_bytes(b"half")
    leftover = tmp_path / ".step-00000002.old"  # the swap had completed: the old copy is garbage
    leftover.mkdir()
    moved = save(tmp_path, 6).rename(tmp_path / ".step-00000006.old")  # killed between the two renames
    others = [tmp_path / ".notes.tmp", tmp_path / "notes.txt"]
    others[0].mkdir()
    others[1].write_text("x")

    removed = clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([torn.name, leftover.name, moved.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".notes.tmp",
        "notes.txt",
        "step-00000002",
        "step-00000006",
    ]
    assert load_checkpoint(tmp_path / "step-00000006").step == 6
    assert clean_stale_temporaries(tmp_path / "missing") == []
