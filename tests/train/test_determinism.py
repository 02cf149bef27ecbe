"""Pre-training on CPU is bitwise deterministic: the same recipe gives the same floats, resumed or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdprompt.train.metrics import read_jsonl

pytestmark = pytest.mark.slow


def overrides(tmp_path: Path, world_root: str, name: str) -> list[str]:
    world = [f"root={world_root}", "train_per_class=4", "test_per_class=2", "val_per_class=1"]
    return [
        f"name={name}",
        f"output_dir={tmp_path / 'runs'}",
        f"shards_dir={tmp_path / 'shards'}",
        "shard_maxcount=32",
        *[f"data.{kv}" for kv in world],
        *[f"eval.{i}.data.{kv}" for i in (0, 1) for kv in world],
        "train.batch_size=32",
        "train.max_steps=6",
        "train.log_every=1",
        "train.shuffle_buffer=64",
        "checkpoint.every_steps=2",
        f"export={tmp_path / 'export' / f'{name}.safetensors'}",
    ]


def outcome(tmp_path: Path, name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    run = tmp_path / "runs" / name / "pretrain"
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]
    return losses, load_file(str(run / "model.safetensors"))


def test_two_identical_pretrain_runs_and_a_resumed_one_are_bitwise_equal(cli, tmp_path, world_root):
    for name in ("a", "b"):
        result = cli("pretrain", "demo/pretrain-student", *overrides(tmp_path, world_root, name))
        assert result.exit_code == 0, result.output
    part = overrides(tmp_path, world_root, "part")
    assert cli("pretrain", "demo/pretrain-student", *part, "train.stop_after_steps=3").exit_code == 0
    assert cli("pretrain", "demo/pretrain-student", *part).exit_code == 0
    losses, weights = outcome(tmp_path, "a")
    assert len(losses) == 6
    for other in ("b", "part"):
        other_losses, other_weights = outcome(tmp_path, other)
        assert other_losses == losses, other
        assert other_weights.keys() == weights.keys()
        assert all(torch.equal(weights[k], other_weights[k]) for k in weights), other
