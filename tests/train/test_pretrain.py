"""`kdprompt pretrain` end to end on the tiny models and a small synthetic world."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import accelerate_launch

from kdprompt.models.loading import resolve_model_name
from kdprompt.train.checkpoint import list_checkpoints
from kdprompt.train.metrics import read_jsonl

pytestmark = pytest.mark.slow


def small_run(tmp_path: Path, world_root: str, name: str, model: str = "kd-tiny-student") -> list[str]:
    """Overrides that shrink the demo recipe to a few seconds."""
    small_world = [f"root={world_root}", "train_per_class=4", "test_per_class=2", "val_per_class=1"]
    return [
        f"name={name}",
        f"output_dir={tmp_path / 'runs'}",
        f"model.name={model}",
        f"shards_dir={tmp_path / 'shards'}",
        "shard_maxcount=32",
        *[f"data.{kv}" for kv in small_world],
        *[f"eval.{i}.data.{kv}" for i in (0, 1) for kv in small_world],
        "train.batch_size=32",
        "train.max_steps=4",
        "train.log_every=1",
        "train.shuffle_buffer=64",
        "checkpoint.every_steps=2",
        f"export={tmp_path / 'export' / f'{name}.safetensors'}",
    ]


def test_pretrain_cli_writes_loadable_weights_metrics_and_checkpoints(cli, tmp_path, world_root):
    result = cli(
        "pretrain", "demo/pretrain-teacher", *small_run(tmp_path, world_root, "p1", "kd-tiny-teacher")
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "p1" / "pretrain"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["zero_shot_top1"]) == {"pretrain_test", "downstream_test"}
    assert all(0 <= v <= 100 for v in metrics["zero_shot_top1"].values())
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert (run / "curves.png").stat().st_size > 1000
    assert list((run / "tb").rglob("events.out.tfevents*")), "TensorBoard events missing"
    # open_clip itself loads the exported weights.
    exported = tmp_path / "export" / "p1.safetensors"
    model, _, _ = open_clip.create_model_and_transforms(
        resolve_model_name("kd-tiny-teacher"), pretrained=str(exported)
    )
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "weights.safetensors"))
    assert torch.equal(model.state_dict()["visual.proj"], weights["visual.proj"])


def test_resume_matches_an_uninterrupted_run(cli, tmp_path, world_root):
    base = small_run(tmp_path, world_root, "full")
    assert cli("pretrain", "demo/pretrain-student", *base).exit_code == 0
    part = small_run(tmp_path, world_root, "part")
    first = cli("pretrain", "demo/pretrain-student", *part, "train.stop_after_steps=2")
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "part" / "pretrain"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "model.safetensors").exists()
    second = cli("pretrain", "demo/pretrain-student", *part)  # resume: auto
    assert second.exit_code == 0, second.output
    full_rows = read_jsonl(tmp_path / "runs" / "full" / "pretrain" / "metrics.jsonl")
    part_rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in part_rows] == [1, 2, 3, 4]
    for a, b in zip(full_rows, part_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    from safetensors.torch import load_file

    full_w = load_file(str(tmp_path / "runs" / "full" / "pretrain" / "model.safetensors"))
    part_w = load_file(str(run / "model.safetensors"))
    assert full_w.keys() == part_w.keys()
    for key in full_w:
        torch.testing.assert_close(full_w[key], part_w[key], rtol=0, atol=1e-6)


def test_resume_from_a_missing_checkpoint_is_a_clear_error(cli, tmp_path, world_root):
    result = cli(
        "pretrain",
        "demo/pretrain-student",
        *small_run(tmp_path, world_root, "r"),
        f"resume={tmp_path / 'nope'}",
    )
    assert result.exit_code == 2
    assert "resume checkpoint" in result.output and "nope" in result.output


@pytest.mark.dist
def test_two_process_cpu_run_reads_disjoint_shards(tmp_path, world_root):
    accelerate_launch(
        [
            "pretrain",
            "demo/pretrain-student",
            *small_run(tmp_path, world_root, "dist"),
            "train.batch_size=16",
            "train.max_steps=3",
        ]
    )
    run = tmp_path / "runs" / "dist" / "pretrain"
    records = [json.loads((run / "data" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    shards0, shards1 = set(records[0]["shards"]), set(records[1]["shards"])
    assert shards0 and shards1 and not shards0 & shards1
    assert records[0]["samples"] == records[1]["samples"] == 3 * 16
