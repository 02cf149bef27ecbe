"""``selection: val``: the best epoch on the few-shot val split ships, for the teacher and the student."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_WORLD
from fixtures_coop import make_imagenet
from safetensors.torch import load_file

import kdprompt.train.distill_loop as distill_loop
from kdprompt.data.coop import CoopData
from kdprompt.data.synthetic import SyntheticData
from kdprompt.errors import KdpromptError
from kdprompt.models.teacher import load_teacher
from kdprompt.train.checkpoint import list_checkpoints, load_checkpoint
from kdprompt.train.selection import teacher_val_split, val_accuracy

EPOCHS = 3
SCRIPTED = [50.0, 70.0, 60.0]  # val top-1 per epoch: epoch 2 of 3 is the best


def distill_args(student_run: dict, tmp_path: Path, name: str) -> list[str]:
    return [
        f"name={name}",
        f"output_dir={tmp_path / 'runs'}",
        f"teacher={student_run['teacher']}",
        f"cache={student_run['cache']}",
        f"student.model.pretrained={student_run['root'] / 'student.safetensors'}",
        "student.adaptation=prompts",
        "student.depth=2",
        f"data.root={student_run['world_root']}",
        *[f"data.{kv}" for kv in TINY_WORLD],
        f"shards_dir={tmp_path / 'shards'}",
        "shard_maxcount=48",
        "train.batch_size=16",
        f"train.epochs={EPOCHS}",
        "train.shuffle_buffer=32",
        "checkpoint.keep_last=100",
        "evaluate=false",
        "selection=val",
    ]


@pytest.fixture()
def scripted_val(monkeypatch):
    """Replace the student's val accuracy by :data:`SCRIPTED`, after measuring the real one."""
    measured: list[tuple[float, list[str], int]] = []

    def fake(clf, split, device, module) -> float:
        measured.append((val_accuracy(clf, split, device, module), list(split.classnames), len(split)))
        return SCRIPTED[len(measured) - 1]

    monkeypatch.setattr(distill_loop, "val_accuracy", fake)
    return measured


def student_weights(ckpt) -> dict[str, torch.Tensor]:
    return {k.removeprefix("student."): v for k, v in ckpt.weights.items() if k.startswith("student.")}


@pytest.mark.slow
def test_distill_selection_val_ships_the_best_epoch_and_survives_resume(
    cli, tmp_path, student_run, scripted_val
):
    result = cli("distill", "demo/distill-student", *distill_args(student_run, tmp_path, "sel"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "sel" / "student"

    # Validated on the teacher's few-shot val split of its (base) classes, by the real measure.
    teacher = load_teacher(student_run["teacher"])
    assert len(scripted_val) == EPOCHS
    assert all(0 <= acc <= 100 and names == teacher.classnames and n > 0 for acc, names, n in scripted_val)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in rows if "val_acc" in r] == SCRIPTED
    expected = "val (epoch 2, 70.00%)"
    assert json.loads((run / "metrics.json").read_text())["selection"] == expected
    assert json.loads((run / "student.json").read_text())["selection"] == expected

    # The shipped student is epoch 2's trainable state, not the last epoch's.
    ckpts = [load_checkpoint(p) for p in list_checkpoints(run / "checkpoints")]
    per_epoch = ckpts[-1].meta["total_steps"] // EPOCHS
    by_step = {c.step: c for c in ckpts}
    best, last = student_weights(by_step[2 * per_epoch]), student_weights(by_step[EPOCHS * per_epoch])
    shipped = load_file(str(run / "student.safetensors"))
    for key, value in best.items():
        assert torch.equal(shipped[key], value), key
    assert any(not torch.equal(shipped[k], v) for k, v in last.items())
    assert by_step[EPOCHS * per_epoch].state["counters"]["best_epoch"] == 2

    # Interrupted after epoch 2 and resumed: the best copy comes back from the checkpoint.
    scripted_val.clear()
    part = distill_args(student_run, tmp_path, "part")
    assert (
        cli("distill", "demo/distill-student", *part, f"train.stop_after_steps={2 * per_epoch + 1}").exit_code
        == 0
    )
    assert cli("distill", "demo/distill-student", *part).exit_code == 0
    resumed = tmp_path / "runs" / "part" / "student"
    assert json.loads((resumed / "metrics.json").read_text())["selection"] == expected
    again = load_file(str(resumed / "student.safetensors"))
    for key, value in shipped.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_teacher_selection_val_names_its_epoch(cli, tmp_path, world_root, tiny_teacher_weights):
    args = [
        "name=tv",
        f"output_dir={tmp_path / 'runs'}",
        f"model.pretrained={tiny_teacher_weights}",
        f"data.root={world_root}",
        *[f"data.{kv}" for kv in TINY_WORLD],
        "fewshot.shots=2",
        "train.batch_size=8",
        "train.epochs=2",
        "method.text_depth=2",
        "method.vision_depth=2",
        f"cache_dir={tmp_path / 'cache'}",
        "evaluate=false",
        "selection=val",
    ]
    result = cli("teacher", "demo/teacher-promptsrc", *args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tv" / "teacher"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accs = [r["val_acc"] for r in rows if "val_acc" in r]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # ties keep the earlier epoch
    expected = f"val (epoch {best + 1}, {accs[best]:.2f}%)"
    assert json.loads((run / "teacher.json").read_text())["selection"] == expected


def test_student_selection_needs_a_val_split(tmp_path, world_root):
    with pytest.raises(KdpromptError, match=r"records no data.*selection: last"):
        teacher_val_split(SimpleNamespace(data_config=None, path=tmp_path))
    make_imagenet(tmp_path)
    imagenet = SimpleNamespace(data_config=CoopData(root=tmp_path, dataset="imagenet"), path=tmp_path)
    with pytest.raises(KdpromptError, match=r"ImageNet has no val split.*use selection: last"):
        teacher_val_split(imagenet)
    no_val = SyntheticData(root=world_root, train_per_class=4, test_per_class=2, val_per_class=0)
    with pytest.raises(KdpromptError, match="no 'val' split"):
        teacher_val_split(SimpleNamespace(data_config=no_val, path=tmp_path))
