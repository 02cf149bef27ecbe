"""`kdprompt clipkd` (CLIP-KD's caption mode) end to end on the tiny models and a small synthetic world."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import accelerate_launch
from safetensors.torch import load_file

from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.loading import resolve_model_name
from kdprompt.train.checkpoint import list_checkpoints
from kdprompt.train.metrics import read_jsonl

pytestmark = pytest.mark.slow

SMALL_WORLD = ["train_per_class=4", "test_per_class=2", "val_per_class=1"]


def small_run(tmp_path: Path, world_root: str, teacher_weights: str, name: str) -> list[str]:
    """Overrides that shrink demo/clipkd-student to a few seconds."""
    small = [f"root={world_root}", *SMALL_WORLD]
    return [
        f"name={name}",
        f"output_dir={tmp_path / 'runs'}",
        f"teacher.pretrained={teacher_weights}",
        f"shards_dir={tmp_path / 'shards'}",
        "shard_maxcount=32",
        *[f"data.{kv}" for kv in small],
        *[f"eval.{i}.data.{kv}" for i in (0, 1) for kv in small],
        "train.batch_size=16",
        "train.max_steps=4",
        "train.log_every=1",
        "train.shuffle_buffer=32",
        "checkpoint.every_steps=2",
        f"export={tmp_path / 'export' / f'{name}.safetensors'}",
    ]


def test_clipkd_cli_trains_both_towers_and_writes_an_open_clip_model(
    cli, tmp_path, world_root, tiny_teacher_weights
):
    result = cli("clipkd", "demo/clipkd-student", *small_run(tmp_path, world_root, tiny_teacher_weights, "k"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "k" / "clipkd"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"task", "fd", "icl", "crd", "loss", "logit_scale", "cross_logit_scale"} <= set(row)
        assert row["loss"] == pytest.approx(row["task"] + row["fd"] + row["icl"] + row["crd"], rel=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["zero_shot_top1"]) == {"pretrain_test", "downstream_test"}
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004"]
    # The checkpoint holds the projectors and ICL's scale (CLIP-KD's own checkpoints drop them).
    ckpt = load_file(str(list_checkpoints(run / "checkpoints")[-1] / "weights.safetensors"))
    assert {"objectives.proj_image.weight", "objectives.proj_text.weight"} <= set(ckpt)
    assert "objectives.terms.icl.cross_logit_scale" in ckpt
    # Both towers trained: the image AND the text tower moved between steps 2 and 4.
    early = load_file(str(list_checkpoints(run / "checkpoints")[0] / "weights.safetensors"))
    for key in (
        "student.visual.proj",
        "student.text_projection",
        "student.transformer.resblocks.0.mlp.c_fc.weight",
    ):
        assert not torch.equal(early[key], ckpt[key]), key
    exported = tmp_path / "export" / "k.safetensors"
    model, _, _ = open_clip.create_model_and_transforms(
        resolve_model_name("kd-tiny-student"), pretrained=str(exported)
    )
    weights = load_file(str(run / "model.safetensors"))
    assert weights.keys() == load_file(str(exported)).keys()
    for key in ("visual.proj", "text_projection", "logit_scale"):
        torch.testing.assert_close(model.state_dict()[key], weights[key], rtol=0, atol=0)
        torch.testing.assert_close(ckpt[f"student.{key}"], weights[key], rtol=0, atol=0)
    # kdprompt loads the export as a base model (what `kdprompt teacher` and `eval --zero-shot` do).
    clip = create_clip(ModelSpec(name="kd-tiny-student", pretrained=str(exported)))
    assert torch.equal(clip.model.state_dict()["text_projection"], weights["text_projection"])


def test_clipkd_export_is_accepted_by_eval_zero_shot(cli, tmp_path, world_root, tiny_teacher_weights):
    args = small_run(tmp_path, world_root, tiny_teacher_weights, "z")
    assert cli("clipkd", "demo/clipkd-student", *args, "train.max_steps=1", "eval=[]").exit_code == 0
    exported = tmp_path / "export" / "z.safetensors"
    out = tmp_path / "eval"
    result = cli(
        "eval", "--zero-shot", f"kd-tiny-student@{exported}", "--data", "synthetic", f"root={world_root}",
        *SMALL_WORLD, "--out", out, "--batch-size", 16, "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        json.loads((out / "metrics.json").read_text())[0]["model"]
        == "zero-shot kd-tiny-student@z.safetensors"
    )


def test_resume_matches_an_uninterrupted_run(cli, tmp_path, world_root, tiny_teacher_weights):
    base = small_run(tmp_path, world_root, tiny_teacher_weights, "full")
    assert cli("clipkd", "demo/clipkd-student", *base, "eval=[]").exit_code == 0
    part = small_run(tmp_path, world_root, tiny_teacher_weights, "part")
    first = cli("clipkd", "demo/clipkd-student", *part, "eval=[]", "train.stop_after_steps=2")
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "part" / "clipkd"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "model.safetensors").exists()
    second = cli("clipkd", "demo/clipkd-student", *part, "eval=[]")  # resume: auto
    assert second.exit_code == 0, second.output
    full_rows = read_jsonl(tmp_path / "runs" / "full" / "clipkd" / "metrics.jsonl")
    part_rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in part_rows] == [1, 2, 3, 4]
    for a, b in zip(full_rows, part_rows, strict=True):
        for key in ("loss", "task", "fd", "icl", "crd", "cross_logit_scale"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)
    full_ckpt = list_checkpoints(tmp_path / "runs" / "full" / "clipkd" / "checkpoints")[-1]
    part_ckpt = list_checkpoints(run / "checkpoints")[-1]
    full_w = load_file(str(full_ckpt / "weights.safetensors"))
    part_w = load_file(str(part_ckpt / "weights.safetensors"))
    assert full_w.keys() == part_w.keys()
    for key in full_w:  # the student, the projectors and ICL's scale
        torch.testing.assert_close(full_w[key], part_w[key], rtol=0, atol=1e-6)


def test_task_only_trains_the_student_as_pretrain_does(cli, tmp_path, world_root, tiny_teacher_weights):
    """``objectives={task: {}}`` is the student's own pre-training: the same initial weights (the teacher
    is built after the student), augmentations, updates and final weights as ``kdprompt pretrain``."""
    clipkd = small_run(tmp_path, world_root, tiny_teacher_weights, "task")
    result = cli("clipkd", "demo/clipkd-student", *clipkd, "objectives={task: {}}", "eval=[]", "export=null")
    assert result.exit_code == 0, result.output
    # demo/pretrain-student on the same shards and schedule: only its model section is named differently.
    same = [kv for kv in clipkd if kv.split("=")[0] in {"output_dir", "shards_dir", "shard_maxcount"}]
    same += [kv for kv in clipkd if kv.startswith(("data.", "train."))]
    result = cli("pretrain", "demo/pretrain-student", "name=scratch", *same, "eval=[]", "export=null")
    assert result.exit_code == 0, result.output
    distilled, scratch = tmp_path / "runs" / "task" / "clipkd", tmp_path / "runs" / "scratch" / "pretrain"
    kd_rows, pt_rows = read_jsonl(distilled / "metrics.jsonl"), read_jsonl(scratch / "metrics.jsonl")
    assert [r["step"] for r in kd_rows] == [r["step"] for r in pt_rows] == [1, 2, 3, 4]
    for a, b in zip(kd_rows, pt_rows, strict=True):  # step 1 equal: the same initial weights
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["lr"] == b["lr"]
    final_kd, final_pt = (
        load_file(str(distilled / "model.safetensors")),
        load_file(str(scratch / "model.safetensors")),
    )
    assert final_kd.keys() == final_pt.keys()
    for key in final_pt:
        torch.testing.assert_close(final_kd[key], final_pt[key], rtol=1e-4, atol=1e-5, msg=key)


def test_gradients_are_clipped_over_the_student_only(tmp_path, world_root, tiny_teacher_weights, monkeypatch):
    """CLIP-KD clips ``model.parameters()`` (the student; ``train_kd_one_epoch``): the projectors and ICL's
    scale neither get clipped nor count towards the norm."""
    from kdprompt.config.clipkd import ClipKDRecipe
    from kdprompt.config.loading import load_recipe
    from kdprompt.train.clipkd_loop import ClipKDStage
    from kdprompt.train.run import Run, run_stage

    clipped: list[set[int]] = []
    optimizer_step = Run.optimizer_step

    def spy(self, optimizer, loss, lr, clip=None):
        params = list(clip[0])
        clipped.append({id(p) for p in params})
        return optimizer_step(self, optimizer, loss, lr, (params, clip[1]))

    monkeypatch.setattr(Run, "optimizer_step", spy)
    overrides = small_run(tmp_path, world_root, tiny_teacher_weights, "clip")
    stage = ClipKDStage(
        load_recipe(ClipKDRecipe, "demo/clipkd-student", [*overrides, "train.max_steps=1", "eval=[]"])
    )
    run_stage(stage)
    student = {id(p) for p in stage.core.student.parameters()}
    objectives = {id(p) for p in stage.core.objectives.parameters()}
    assert objectives and clipped == [student]


def test_old_image_objective_names_are_refused_with_their_new_names(cli):
    result = cli("distill", "demo/distill-student", "objectives={kl: {}, icl: {weight: 1}}", "--dry-run")
    assert result.exit_code == 2
    assert "objectives.icl: objective 'icl' is now called 'icl_image'" in result.output
    assert "Traceback" not in result.output
    result = cli("clipkd", "demo/clipkd-student", "objectives={task: {}, icl_image: {}}", "--dry-run")
    assert result.exit_code == 2
    assert "objectives.icl_image: got 'icl_image'; allowed: crd, fd, icl, task" in result.output


def test_shards_without_captions_are_a_clear_error(tmp_path, world_root, tiny_teacher_weights):
    from kdprompt.config.clipkd import ClipKDRecipe
    from kdprompt.errors import KdpromptError
    from kdprompt.train.clipkd_loop import ClipKDStage

    recipe = ClipKDRecipe.model_validate(
        {
            "name": "x",
            "output_dir": str(tmp_path),
            "teacher": {"name": "kd-tiny-teacher", "pretrained": tiny_teacher_weights},
            "student": {"name": "kd-tiny-student"},
            "data": {"source": "synthetic", "root": world_root, "domain": "pretrain"},
        }
    )
    stage = ClipKDStage(recipe)
    stage.urls = ["/data/train-000000.tar"]
    with pytest.raises(KdpromptError, match="no captions"):
        stage.step(None, {"text": ["", ""], "image": torch.zeros(2, 3, 32, 32)})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- several processes


def _gathered_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank of a 2-process gloo group: loss and student gradients of this rank's half of the batch."""
    from kdprompt.train.clipkd_loop import ClipKDModule

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        module, images, tokens, t_img, t_txt = _setup()
        half = images.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        model = ClipKDModule(module.student, module.objectives, rank, world, gather_with_grad=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        terms = ddp(images[part], tokens[part], t_img[part], t_txt[part], torch.tensor(50.0))
        terms["loss"].backward()
        if rank == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"terms": {k: v.detach() for k, v in terms.items()}, "grads": grads}, out)
    finally:
        torch.distributed.destroy_process_group()


def _setup():
    from kdprompt.objectives.clipkd_combined import ClipKDObjectives, clipkd_defaults
    from kdprompt.train.clipkd_loop import ClipKDModule

    torch.manual_seed(0)
    clip = create_clip(ModelSpec(name="kd-tiny-student"))
    objectives = ClipKDObjectives(clipkd_defaults(), 64, 128)
    module = ClipKDModule(clip.model, objectives, 0, 1, gather_with_grad=True)
    images = torch.randn(8, 3, 32, 32)
    tokens = clip.tokenizer([f"a photo of thing {i}" for i in range(8)])
    t_img = F.normalize(torch.randn(8, 128), dim=-1)
    t_txt = F.normalize(torch.randn(8, 128), dim=-1)
    return module, images, tokens, t_img, t_txt


@pytest.mark.dist
def test_two_ranks_with_gathered_features_equal_one_process_on_the_global_batch(tmp_path):
    """open_clip's gather (gather_with_grad): 2 ranks x 4 pairs give the loss and, after DDP's averaging,
    the gradients of one process on all 8 pairs."""
    import torch.multiprocessing as mp

    module, images, tokens, t_img, t_txt = _setup()
    terms = module(images, tokens, t_img, t_txt, torch.tensor(50.0))
    terms["loss"].backward()
    out = str(tmp_path / "rank0.pt")
    init = f"file://{tempfile.mkdtemp(dir=tmp_path)}/rendezvous"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_gathered_worker, args=(2, init, out), nprocs=2, join=True)
    got = torch.load(out)
    for key, value in terms.items():
        torch.testing.assert_close(got["terms"][key], value.detach(), rtol=1e-5, atol=1e-6)
    expected = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert got["grads"].keys() == expected.keys()
    assert "objectives.terms.icl.cross_logit_scale" in expected and "student.logit_scale" in expected
    for name, grad in expected.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.dist
def test_two_process_cpu_run(tmp_path, world_root, tiny_teacher_weights):
    accelerate_launch(
        ["clipkd", "demo/clipkd-student", *small_run(tmp_path, world_root, tiny_teacher_weights, "dist"),
         "train.batch_size=8", "train.max_steps=3", "eval=[]"]
    )  # fmt: skip
    run = tmp_path / "runs" / "dist" / "clipkd"
    records = [json.loads((run / "data" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert not set(records[0]["shards"]) & set(records[1]["shards"])
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    open_clip.create_model_and_transforms(
        resolve_model_name("kd-tiny-student"), pretrained=str(tmp_path / "export" / "dist.safetensors")
    )
