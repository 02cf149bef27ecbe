"""A training run killed (SIGKILL) at each phase of writing a checkpoint resumes to the uninterrupted result.

Each case runs the real ``kdprompt pretrain`` on the tiny student and a small synthetic world in a
subprocess with ``KDPROMPT_CRASH_AT`` set to a phase of :func:`kdprompt.train.checkpoint.save_checkpoint`
on its third checkpoint, then runs it again (``resume: auto``) and compares the final weights and the
logged losses with one uninterrupted run, bit for bit. A second case proves the run lock refuses a
duplicate run on every rank of ``accelerate launch`` (no rank left waiting).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_WORLD
from safetensors.torch import load_file

from kdprompt.faults import CRASH_ENV
from kdprompt.train.checkpoint import list_checkpoints, load_checkpoint
from kdprompt.train.metrics import read_jsonl
from kdprompt.train.runlock import acquire_run_lock

pytestmark = pytest.mark.faults

PHASES = [
    "checkpoint.weights_written",
    "checkpoint.state_written",
    "checkpoint.meta_written",
    "checkpoint.renamed",
]


def overrides(root: Path, world_root: str, name: str) -> list[str]:
    """Four steps, a checkpoint after each, on a world of a few dozen images."""
    world = [f"root={world_root}", *TINY_WORLD]
    return [
        f"name={name}",
        f"output_dir={root / 'runs'}",
        "model.name=kd-tiny-student",
        f"shards_dir={root / 'shards'}",
        "shard_maxcount=32",
        *[f"data.{kv}" for kv in world],
        *[f"eval.{i}.data.{kv}" for i in (0, 1) for kv in world],
        "train.batch_size=32",
        "train.max_steps=4",
        "train.log_every=1",
        "train.shuffle_buffer=64",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
    ]


def pretrain(args: list[str], crash: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: crash}
    return subprocess.run(
        [sys.executable, "-m", "kdprompt", "pretrain", "demo/pretrain-student", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, world_root) -> Path:
    """The shared root (shards too) and, under ``runs/reference``, one uninterrupted run."""
    root = tmp_path_factory.mktemp("run_faults")
    proc = pretrain(overrides(root, world_root, "reference"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("phase", PHASES)
def test_a_run_killed_while_checkpointing_resumes_to_the_uninterrupted_result(reference, world_root, phase):
    args = overrides(reference, world_root, phase.replace(".", "-"))
    run = reference / "runs" / phase.replace(".", "-") / "pretrain"
    ckpts = run / "checkpoints"

    killed = pretrain(args, crash=f"{phase}@3")  # while writing the checkpoint of step 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Killed after the rename, step 3 is in place and step 1 not yet rotated out; else step 3 is a
    # half-written temporary beside the last two complete checkpoints.
    complete = phase == "checkpoint.renamed"
    names = [p.name for p in list_checkpoints(ckpts)]
    assert names == (["step-00000001", "step-00000002", "step-00000003"] if complete else names[-2:])
    assert names[-1] == ("step-00000003" if complete else "step-00000002")
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
    assert bool(leftovers) != complete, leftovers

    resumed = pretrain(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = 3 if complete else 2
    assert f"step-0000000{last} (step {last})" in resumed.stdout
    assert "warning" not in resumed.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003", "step-00000004"]  # no temporaries
    load_checkpoint(ckpts / "step-00000004")  # checksums verified

    expected = reference / "runs" / "reference" / "pretrain"
    assert losses(run) == losses(expected) and [s for s, _ in losses(run)] == [1, 2, 3, 4]
    a, b = load_file(str(expected / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.dist
def test_a_duplicate_distributed_run_is_refused_on_every_rank(reference, world_root):
    run = reference / "runs" / "busy" / "pretrain"
    held = acquire_run_lock(run)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", CRASH_ENV: ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", "0", "-m", "kdprompt", "pretrain", "demo/pretrain-student"]
    try:
        proc = subprocess.run(
            [*launch, *overrides(reference, world_root, "busy")],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,  # a rank left waiting at a barrier would hang until this
        )
    finally:
        held.release()
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("error: run directory")]
    assert len(refusals) == 2, proc.stderr[-3000:]  # both ranks, with the same one line
    assert f"pid {os.getpid()}" in refusals[0] and refusals[0] == refusals[1]
    # Each rank exits as a user error; the launcher may stop the second with SIGTERM once the first has
    # failed (torchrun's policy), but no rank may abort (the store torn down under it) or hang.
    assert proc.stderr.count("exitcode  : 2") >= 1 and "SIGABRT" not in proc.stderr
    # The launcher reports its failed children with its own traceback; none may come from kdprompt.
    assert not [
        line for line in proc.stderr.splitlines() if line.startswith("  File") and "/kdprompt/" in line
    ]
    assert not (run / "metrics.jsonl").exists()
