"""Shared fixtures: small synthetic worlds and a CLI runner. No network, no pretrained weights."""

from __future__ import annotations

import os
import subprocess
import sys

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
