"""Shared fixtures: small synthetic worlds and a CLI runner. No network, no pretrained weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world_root(tmp_path_factory) -> str:
    """A root for synthetic worlds shared by the whole session (materialised once per config)."""
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture()
def cli():
    """Invoke the kdprompt CLI in-process; returns click's Result."""
    from click.testing import CliRunner

    from kdprompt.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def tiny_teacher_weights(tmp_path_factory) -> str:
    """A randomly initialised kd-tiny-teacher saved as a weights file (stands in for pre-trained weights)."""
    from kdprompt.models import ModelSpec, create_clip, save_clip_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "kd-tiny-teacher-random.safetensors"
    save_clip_weights(create_clip(ModelSpec(name="kd-tiny-teacher")).model, path)
    return str(path)


def accelerate_launch(args: list[str], processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m kdprompt ARGS`` under ``accelerate launch`` with CPU processes (a real DDP run)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "kdprompt",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


TINY_WORLD = ["train_per_class=4", "test_per_class=2", "val_per_class=1"]


def distill_args(trained, tmp_path: Path, name: str, adaptation: str = "full") -> list[str]:
    """Overrides of `demo/distill-student` for a 2-epoch run on the tiny world against ``trained``."""
    return [
        f"name={name}",
        f"output_dir={tmp_path / 'runs'}",
        f"teacher={trained['teacher']}",
        f"cache={trained['cache']}",
        f"student.model.pretrained={trained['student']}",
        f"student.adaptation={adaptation}",
        "student.depth=2",
        f"data.root={trained['world_root']}",
        *[f"data.{kv}" for kv in TINY_WORLD],
        f"shards_dir={tmp_path / 'shards'}",
        "shard_maxcount=48",
        "train.batch_size=16",
        "train.epochs=2",
        "train.log_every=1",
        "train.shuffle_buffer=32",
    ]


def train_tiny_teacher(root, world_root: str, teacher_weights: str) -> dict:
    """A tiny PromptSRC teacher with its cache (through the CLI), and student weights standing in for a
    pre-trained student, under ``root``.

    Returns paths: ``root``, ``teacher``, ``cache``, ``student`` (the initial student weights), ``world_root``.
    """
    from click.testing import CliRunner

    from kdprompt.cli import main
    from kdprompt.models import ModelSpec, create_clip, save_clip_weights

    args = [
        "teacher",
        "demo/teacher-promptsrc",
        "name=t",
        f"output_dir={root / 'runs'}",
        f"model.pretrained={teacher_weights}",
        f"data.root={world_root}",
        *[f"data.{kv}" for kv in TINY_WORLD],
        "fewshot.shots=2",
        "train.batch_size=8",
        "train.epochs=1",
        "method.text_depth=2",
        "method.vision_depth=2",
        f"cache_dir={root / 'cache' / 't'}",
        "evaluate=false",
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    torch.manual_seed(1)
    student_weights = root / "student.safetensors"
    save_clip_weights(create_clip(ModelSpec(name="kd-tiny-student")).model, student_weights)
    return {
        "root": root,
        "teacher": root / "runs" / "t" / "teacher",
        "cache": root / "cache" / "t",
        "student": student_weights,
        "world_root": world_root,
    }


@pytest.fixture(scope="session")
def student_run(tmp_path_factory, world_root, tiny_teacher_weights) -> dict:
    """A tiny prompted student distilled from :func:`train_tiny_teacher`'s teacher, through the CLI.

    Returns paths: ``root``, ``teacher``, ``cache``, ``student`` (runs/s/student), ``world_root``.
    """
    from click.testing import CliRunner

    from kdprompt.cli import main

    root = tmp_path_factory.mktemp("student-run")
    trained = train_tiny_teacher(root, world_root, tiny_teacher_weights)
    distill_args = [
        "distill",
        "demo/distill-student",
        "name=s",
        f"output_dir={root / 'runs'}",
        f"teacher={trained['teacher']}",
        f"cache={trained['cache']}",
        f"student.model.pretrained={trained['student']}",
        "student.adaptation=prompts",
        "student.depth=2",
        f"data.root={world_root}",
        *[f"data.{kv}" for kv in TINY_WORLD],
        f"shards_dir={root / 'shards'}",
        "shard_maxcount=48",
        "train.batch_size=16",
        "train.epochs=1",
        "train.shuffle_buffer=32",
        "evaluate=false",
    ]
    result = CliRunner().invoke(main, distill_args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {**trained, "student": root / "runs" / "s" / "student"}


@pytest.fixture(scope="session")
def bundle_dir(student_run, tmp_path_factory):
    """``kdprompt export`` of :func:`student_run`, with the ONNX graph."""
    from kdprompt.deploy import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(student_run["student"], out, onnx=True)
    return out


def assert_dassl_lr_per_epoch(metrics_jsonl: Path, train: Any) -> None:
    """Every logged training row of a run with ``lr_schedule: dassl`` has its epoch's Dassl lr.

    Rows are logged after their step, so a row at ``step`` trained at step ``step - 1``.
    """
    from kdprompt.train.metrics import read_jsonl
    from kdprompt.train.runtime import dassl_epoch_lr

    rows = [r for r in read_jsonl(metrics_jsonl) if "lr" in r]
    per_epoch = rows[-1]["step"] // train.epochs
    for row in rows:
        epoch = (row["step"] - 1) // per_epoch
        expected = dassl_epoch_lr(epoch, train.epochs, train.lr, train.warmup_epochs, train.warmup_lr)
        assert row["lr"] == pytest.approx(expected, rel=1e-9), row
    assert len({row["lr"] for row in rows}) == train.epochs
