"""The run scaffold (kdprompt.train.run) on a tiny stage: a linear model on random tensors, in seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdprompt.config.base import StrictModel
from kdprompt.config.common import CheckpointConfig, LoopConfig, Resume
from kdprompt.errors import KdpromptError
from kdprompt.train.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, restore_rng_on_resume
from kdprompt.train.metrics import read_jsonl
from kdprompt.train.run import Run, Stage, open_run, run_stage
from kdprompt.train.runlock import acquire_run_lock
from kdprompt.train.runtime import cosine_lr

SAMPLES, BATCH = 16, 4  # 4 steps per epoch


class TinyTrain(LoopConfig):
    lr: float = 0.1


class TinyRecipe(StrictModel):
    recipe: Literal["tiny"] = "tiny"
    name: str = "tiny"
    seed: int = 0
    output_dir: Path
    resume: Resume | Path = "auto"
    train: TinyTrain = TinyTrain(epochs=2, log_every=1, mixed_precision="no")
    checkpoint: CheckpointConfig = CheckpointConfig(every_steps=2, keep_last=10)


class TinyStage(Stage):
    """Regression of random targets by a linear layer; batches carry noise from the global RNG, so a resumed
    run only matches when the scaffold restores the RNG state."""

    name = "tiny"

    def __init__(self, recipe: TinyRecipe, epoch_checkpoints: bool = False) -> None:
        super().__init__(recipe)
        self.epoch_checkpoints = epoch_checkpoints
        self.epoch_ends: list[int] = []
        self.modes: set[bool] = set()  # model.training at each step
        self.finished = False

    def run_dir(self) -> Path:
        return Path(self.recipe.output_dir) / self.recipe.name / "tiny"

    def setup(self, run: Run) -> None:
        self.model = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1234)
        self.x, self.y = torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g)
        run.per_epoch = SAMPLES // BATCH
        run.total_steps = self.recipe.train.max_steps or self.recipe.train.epochs * run.per_epoch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.recipe.train.lr, momentum=0.9)
        self.counters = {"seen": 0}

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt.weights.items()})

    def batches(self, run: Run, restored_rng: dict | None) -> Iterator[tuple[int, Any]]:
        step = run.step
        while step < run.stop_at:
            epoch, skip = divmod(step, run.per_epoch)
            order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(epoch))
            if restored_rng is not None:
                restore_rng_on_resume(restored_rng, run.main, step)
                restored_rng = None
            for i in range(skip, run.per_epoch):
                idx = order[i * BATCH : (i + 1) * BATCH]
                yield epoch, (self.x[idx] + 0.1 * torch.randn(BATCH, 4), self.y[idx])
                step += 1
                if step >= run.stop_at:
                    return

    def step(self, run: Run, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        self.modes.add(self.model.training)
        loss = F.mse_loss(self.model(x), y)
        lr = cosine_lr(run.step, run.total_steps, self.recipe.train.lr)
        run.optimizer_step(self.optimizer, loss, lr)
        self.counters["seen"] += len(x)
        return {"loss": loss}

    def row(self, run: Run, epoch: int, terms: dict[str, Tensor]) -> dict[str, Any]:
        return {**run.mean(terms), "epoch": epoch, "lr": self.lr()}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.3f}"}

    def epoch_end(self, run: Run) -> None:
        self.epoch_ends.append(run.step)
        run.metrics.log({"epoch_marker": run.step // run.per_epoch}, run.step)

    def tensors(self) -> dict[str, Tensor]:
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}

    def checkpoint_meta(self, run: Run, epoch_end: bool) -> dict[str, Any]:
        return {"epoch_end": epoch_end}

    def finish(self, run: Run) -> None:
        self.finished = True
        save_file(
            {k: v.contiguous() for k, v in self.tensors().items()}, str(run.run_dir / "final.safetensors")
        )


def tiny(tmp_path: Path, name: str = "tiny", **train: Any) -> TinyRecipe:
    cfg = TinyTrain(**{"epochs": 2, "log_every": 1, "mixed_precision": "no", **train})
    return TinyRecipe(output_dir=tmp_path / "runs", name=name, train=cfg)


def run_dir(tmp_path: Path, name: str) -> Path:
    return tmp_path / "runs" / name / "tiny"


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_a_run_writes_recipe_metrics_checkpoints_and_finishes(tmp_path, capsys):
    stage = TinyStage(tiny(tmp_path, "full"))
    out = run_stage(stage)
    assert out == run_dir(tmp_path, "full") and stage.finished and stage.modes == {True}
    assert (out / "recipe.yaml").read_text().startswith("recipe: tiny\n")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert list(rows[0]) == ["step", "loss", "epoch", "lr"]
    assert [r["epoch"] for r in rows] == [0] * 4 + [1] * 4
    assert rows[-1]["loss"] < rows[0]["loss"]
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["step-00000002", "step-00000004", "step-00000006", "step-00000008"]
    last = load_checkpoint(out / "checkpoints" / "step-00000008")
    assert list(last.meta) == ["step", "epoch_end", "total_steps", "recipe_fingerprint", "sha256"]
    assert last.meta["total_steps"] == 8 and last.meta["epoch_end"] is True
    assert last.state["counters"] == {"seen": 8 * BATCH}
    assert set(last.state) == {"optimizer", "counters", "rng"}
    assert list((out / "tb").rglob("events.out.tfevents*"))
    assert "tiny full" in capsys.readouterr().err  # the progress bar


def test_resume_after_stop_after_steps_equals_an_uninterrupted_run(tmp_path, capsys):
    run_stage(TinyStage(tiny(tmp_path, "full")))
    part = tiny(tmp_path, "part", stop_after_steps=3)
    stage = TinyStage(part)
    run_stage(stage)
    out = run_dir(tmp_path, "part")
    assert not stage.finished and not (out / "final.safetensors").exists()
    assert "stopped at step 3/8 (train.stop_after_steps)" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000003"]
    assert [s for s, _ in losses(out)] == [1, 2, 3]

    second = TinyStage(tiny(tmp_path, "part", stop_after_steps=3))
    run_stage(second)  # 3 more steps: 4..6
    assert "resuming from" in capsys.readouterr().out and not second.finished
    third = TinyStage(tiny(tmp_path, "part"))
    run_stage(third)
    assert third.finished and third.counters == {"seen": 8 * BATCH}
    assert losses(out) == losses(run_dir(tmp_path, "full"))  # bitwise: the same floats
    a = load_file(str(run_dir(tmp_path, "full") / "final.safetensors"))
    b = load_file(str(out / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_after_the_resumed_checkpoint_are_logged_once(tmp_path):
    run_stage(TinyStage(tiny(tmp_path, "full")))
    run_stage(TinyStage(tiny(tmp_path, "crash", stop_after_steps=3)))
    out = run_dir(tmp_path, "crash")
    # As if the process died after logging step 3 but before its checkpoint.
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    run_stage(TinyStage(tiny(tmp_path, "crash")))
    assert losses(out) == losses(run_dir(tmp_path, "full"))


def test_resume_from_a_named_checkpoint_and_never(tmp_path):
    recipe = tiny(tmp_path, "named")
    run_stage(TinyStage(recipe))
    out = run_dir(tmp_path, "named")
    before = losses(out)
    again = recipe.model_copy(update={"resume": out / "checkpoints" / "step-00000004"})
    run_stage(TinyStage(again))
    assert losses(out) == before
    fresh = TinyStage(recipe.model_copy(update={"resume": "never"}))
    run, restored_rng = open_run(fresh)
    assert run.step == 0 and restored_rng is None and run.stop_at == 8


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path):
    run_stage(TinyStage(tiny(tmp_path, "same", stop_after_steps=2)))
    changed = tiny(tmp_path, "same").model_copy(update={"seed": 9})
    with pytest.raises(KdpromptError, match="written by a different recipe"):
        run_stage(TinyStage(changed))
    # Where and how it logs is not the recipe: those may change on resume.
    run_stage(TinyStage(tiny(tmp_path, "same", log_every=3)))
    assert (run_dir(tmp_path, "same") / "final.safetensors").is_file()
    run_stage(TinyStage(changed.model_copy(update={"resume": "never"})))


def test_checkpoints_rotate_to_keep_last(tmp_path):
    recipe = tiny(tmp_path, "rot").model_copy(
        update={"checkpoint": CheckpointConfig(every_steps=1, keep_last=3)}
    )
    run_stage(TinyStage(recipe))
    names = [p.name for p in list_checkpoints(run_dir(tmp_path, "rot") / "checkpoints")]
    assert names == ["step-00000006", "step-00000007", "step-00000008"]


def test_epoch_checkpoints_log_and_checkpoint_every_epoch_end(tmp_path):
    recipe = tiny(tmp_path, "ep", log_every=3, epochs=3).model_copy(
        update={"checkpoint": CheckpointConfig(every_steps=5, keep_last=10)}
    )
    stage = TinyStage(recipe, epoch_checkpoints=True)
    run_stage(stage)
    out = run_dir(tmp_path, "ep")
    assert stage.epoch_ends == [4, 8, 12]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [3, 4, 6, 8, 9, 12]
    assert [(r["step"], r["epoch_marker"]) for r in rows if "epoch_marker" in r] == [(4, 1), (8, 2), (12, 3)]
    metas = {p.name: load_checkpoint(p).meta["epoch_end"] for p in list_checkpoints(out / "checkpoints")}
    assert metas == {
        "step-00000004": True,
        "step-00000005": False,
        "step-00000008": True,
        "step-00000010": False,
        "step-00000012": True,
    }


def test_without_epoch_checkpoints_epoch_end_is_not_called(tmp_path):
    stage = TinyStage(tiny(tmp_path, "noep", log_every=3))
    run_stage(stage)
    assert stage.epoch_ends == []
    assert [r["step"] for r in read_jsonl(run_dir(tmp_path, "noep") / "metrics.jsonl")] == [3, 6, 8]


def test_max_steps_and_a_stop_beyond_the_end(tmp_path):
    stage = TinyStage(tiny(tmp_path, "short", max_steps=5, stop_after_steps=50))
    run_stage(stage)
    out = run_dir(tmp_path, "short")
    assert stage.finished and [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]
    assert json.loads((out / "checkpoints" / "step-00000005" / "meta.json").read_text())["total_steps"] == 5
    # A finished run resumed again takes no step and finishes again from its last checkpoint.
    again = TinyStage(tiny(tmp_path, "short", max_steps=5))
    run_stage(again)
    assert again.finished and [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]


def test_open_run_builds_without_writing_the_run_directory(tmp_path):
    stage = TinyStage(tiny(tmp_path, "bench"))
    run, _ = open_run(stage, resume=False, tensorboard=False)
    assert (run.main, run.rank, run.world) == (True, 0, 1)
    assert run.total_steps == 8 and run.per_epoch == 4 and run.fingerprint
    terms = stage.step(run, (torch.randn(BATCH, 4), torch.randn(BATCH, 1)))
    assert set(terms) == {"loss"} and stage.counters == {"seen": BATCH}
    assert not (tmp_path / "runs").exists()


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def test_a_bit_rotten_newest_checkpoint_is_skipped_and_the_run_still_matches(tmp_path, capsys):
    run_stage(TinyStage(tiny(tmp_path, "full")))
    run_stage(TinyStage(tiny(tmp_path, "rot", stop_after_steps=4)))
    out = run_dir(tmp_path, "rot")
    flip_last_byte(out / "checkpoints" / "step-00000004" / "weights.safetensors")
    capsys.readouterr()
    stage = TinyStage(tiny(tmp_path, "rot"))
    run_stage(stage)
    captured = capsys.readouterr()
    assert "warning: skipping damaged checkpoint step-00000004" in captured.err
    assert "weights.safetensors does not match the sha256" in captured.err
    assert "resuming from" in captured.out and "step 2)" in captured.out
    assert stage.finished and losses(out) == losses(run_dir(tmp_path, "full"))
    a = load_file(str(run_dir(tmp_path, "full") / "final.safetensors"))
    b = load_file(str(out / "final.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    load_checkpoint(out / "checkpoints" / "step-00000004")  # redone: sound again


def test_a_second_run_of_the_same_directory_is_refused_naming_the_first(tmp_path):
    out = run_dir(tmp_path, "busy")
    held = acquire_run_lock(out)
    try:
        stray = out / "checkpoints" / ".step-00000002.abcd1234.tmp"
        stray.mkdir(parents=True)  # the live run's temporary: must survive the refused run
        with pytest.raises(KdpromptError) as err:
            run_stage(TinyStage(tiny(tmp_path, "busy")))
        message = str(err.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "in use by another run" in message and "wait" in message and "name=" in message
        assert "\n" not in message and stray.is_dir() and not (out / "metrics.jsonl").exists()
        # kdprompt bench distill opens a run without the lock: never refused, writes nothing.
        run, _ = open_run(TinyStage(tiny(tmp_path, "busy")), resume=False, tensorboard=False)
        assert run.lock is None
    finally:
        held.release()
    stage = TinyStage(tiny(tmp_path, "busy"))
    run_stage(stage)
    assert stage.finished and not stray.exists()
    acquire_run_lock(out).release()  # the finished run released its lock


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = run_dir(tmp_path, "killed")
    script = (
        "import os, signal, sys; from kdprompt.train.runlock import acquire_run_lock; "
        "acquire_run_lock(sys.argv[1]); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)])
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((out / "run.lock").read_text())["pid"] == proc.pid  # the file stays, the lock not
    stage = TinyStage(tiny(tmp_path, "killed", max_steps=2))
    run_stage(stage)
    assert stage.finished


def test_a_refused_or_failed_run_releases_its_lock(tmp_path):
    recipe = tiny(tmp_path, "fail")
    out = run_dir(tmp_path, "fail")
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002" / "meta.json").write_text("")
    with pytest.raises(KdpromptError, match="every checkpoint under"):
        run_stage(TinyStage(recipe))
    acquire_run_lock(out).release()


def test_a_dry_run_is_not_blocked_by_a_live_run(cli, tmp_path):
    out = tmp_path / "runs" / "busy" / "pretrain"
    held = acquire_run_lock(out)
    try:
        result = cli(
            "pretrain", "demo/pretrain-student", "--dry-run", "name=busy", f"output_dir={tmp_path / 'runs'}"
        )
    finally:
        held.release()
    assert result.exit_code == 0 and "name: busy" in result.output


def test_a_run_directory_that_cannot_be_created_is_one_clear_error(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "blocked").write_text("a file where the run directory should go")
    with pytest.raises(KdpromptError, match=r"cannot lock the run directory .*blocked.*check output_dir"):
        run_stage(TinyStage(tiny(tmp_path, "blocked")))
