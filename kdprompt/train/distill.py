"""``kdprompt distill``: a student learns from a frozen teacher on unlabelled webdataset shards.

Per batch the teacher encodes the images once (no gradients, never DDP-wrapped), the class text
features come from the teacher's cache (never re-encoded), and the student + projector train on the
weighted objectives. Labels in the shards, if any, are ignored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdprompt.config.distill import DistillRecipe
from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.config.loading import dump_recipe
from kdprompt.io import write_json_atomic, write_text_atomic
from kdprompt.train.checkpoint import resume_training, save_training_checkpoint
from kdprompt.train.metrics import MetricsLog, plot_curves
from kdprompt.train.runtime import (
    StreamMeter,
    cosine_lr,
    ended_early,
    epoch_plan,
    make_accelerator,
    set_lr,
    stream_steps,
    write_data_record,
)


def run_dir_of(recipe: DistillRecipe) -> Path:
    """``<output_dir>/<name>/student``."""
    return Path(recipe.output_dir) / recipe.name / "student"


def cache_of(recipe: DistillRecipe) -> Path:
    """The cache the student trains against (``cache/<teacher run name>`` unless set)."""
    return recipe.cache or Path("cache") / Path(recipe.teacher).resolve().parent.name


def view_converter(src: Any, dst: Any) -> Any:
    """A function mapping a batch preprocessed for ``src`` to the preprocessing of ``dst``.

    Both models see the same augmented image: the student's view is un-normalised, resized when the
    image sizes differ, and normalised with the teacher's mean/std.
    """

    def norm(tf: Any) -> tuple[Tensor, Tensor, int]:
        steps = getattr(tf, "transforms", [])
        n = next((t for t in steps if t.__class__.__name__ == "Normalize"), None)
        size = next((getattr(t, "size", None) for t in steps if hasattr(t, "size")), None)
        size = size if isinstance(size, int) else (size[0] if size else 0)
        mean = torch.tensor(n.mean if n else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(n.std if n else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        return mean, std, size

    ms, ss, size_s = norm(src)
    mt, st, size_t = norm(dst)

    def convert(x: Tensor) -> Tensor:
        raw = x * ss.to(x) + ms.to(x)
        if size_t and size_s and size_t != size_s:
            raw = F.interpolate(raw, size=(size_t, size_t), mode="bicubic", align_corners=False)
        return (raw - mt.to(x)) / st.to(x)

    return convert


class DistillModule(nn.Module):
    """Student + objectives in one module, so DDP syncs the projector, prompts and ICL temperature together."""

    def __init__(self, student: nn.Module, objectives: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.objectives = objectives

    def forward(self, images: Tensor, teacher_features: Tensor, text: Tensor, logit_scale: Tensor) -> dict:
        from kdprompt.objectives import DistillBatch

        s = self.student(images)
        return self.objectives(
            DistillBatch(student=s, teacher=teacher_features, text=text, logit_scale=logit_scale)
        )


def run_distill(recipe: DistillRecipe) -> Path:
    """Distill, checkpoint, write the student artefact and evaluate; returns the run directory."""
    from kdprompt.models.loading import create_clip
    from kdprompt.models.student import Student
    from kdprompt.models.teacher import load_teacher
    from kdprompt.objectives import DistillObjectives
    from kdprompt.text_features import load_cache

    run_dir = run_dir_of(recipe)
    cfg = recipe.train
    accelerator = make_accelerator(run_dir, cfg.mixed_precision)
    main, rank, world, device = (
        accelerator.is_main_process,
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.device,
    )
    set_seed(recipe.seed)
    teacher = load_teacher(recipe.teacher)
    teacher.requires_grad_(False)
    teacher.eval().to(device)
    cache = load_cache(cache_of(recipe), expect_fingerprint=teacher.fingerprint, load_index=False)
    text = cache.features.to(device)
    logit_scale = torch.tensor(cache.logit_scale, device=device)

    student = Student(create_clip(recipe.student.model), recipe.student, out_dim=cache.embed_dim)
    objectives = DistillObjectives(recipe.objectives)
    module = DistillModule(student, objectives)
    to_teacher = view_converter(student.train_transform, teacher.train_transform)

    urls, _, per_epoch, total_steps = epoch_plan(recipe, world, accelerator)
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    fingerprint = hashlib.sha256(f"{recipe_fingerprint(recipe)}|{teacher.fingerprint}".encode()).hexdigest()[
        :16
    ]
    ckpt_dir = run_dir / "checkpoints"
    step, counters, restored_rng = 0, {"corrupt": 0, "samples": 0}, None
    ckpt = resume_training(recipe.resume, ckpt_dir, fingerprint, optimizer, main=main)
    if ckpt is not None:
        module.load_state_dict(ckpt.weights, strict=False)
        step, counters, restored_rng = ckpt.step, dict(ckpt.state["counters"]), ckpt.state["rng"]
    module, optimizer = accelerator.prepare(module, optimizer)
    core: DistillModule = accelerator.unwrap_model(module)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator)
    metrics.truncate_after(step)
    accelerator.init_trackers("distill")

    def trainable() -> dict[str, Tensor]:
        state = {f"student.{k}": v for k, v in core.student.trainable_state().items()}
        state.update({f"objectives.{k}": v for k, v in core.objectives.state_dict().items()})
        return state

    def checkpoint() -> None:
        save_training_checkpoint(
            accelerator,
            ckpt_dir,
            step,
            trainable,
            optimizer,
            counters,
            {"total_steps": total_steps, "recipe_fingerprint": fingerprint},
            recipe.checkpoint.keep_last,
        )

    stop_at = min(total_steps, step + cfg.stop_after_steps) if cfg.stop_after_steps else total_steps
    warmup_steps = cfg.warmup_epochs * per_epoch
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc=f"distill {recipe.name}", unit="step")
    meter = StreamMeter(counters, world)
    module.train()
    batches = stream_steps(
        urls,
        cfg,
        core.student.train_transform,
        seed=recipe.seed,
        step=step,
        stop_at=stop_at,
        per_epoch=per_epoch,
        rank=rank,
        world=world,
        restored_rng=restored_rng,
        main=main,
    )
    for epoch, batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        set_lr(optimizer, cosine_lr(step, total_steps, cfg.lr, warmup_steps, cfg.warmup_lr))
        with accelerator.autocast():
            with torch.no_grad():
                t = teacher.encode_images(to_teacher(images)).float()
            terms = module(images, t, text, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(terms["loss"])
        optimizer.step()
        step += 1
        meter.record(batch)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            row = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
            row.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"], **meter.window(accelerator))
            metrics.log(row, step)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
        if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0 and step < stop_at:
            checkpoint()
    bar.close()
    checkpoint()
    if ended_early(step, total_steps, accelerator):
        return run_dir
    if world > 1:
        # DDP keeps parameters equal but each rank's last forward updated its own BatchNorm statistics:
        # adopt rank 0's, so every rank ends with the same student.
        for buffer in core.buffers():
            torch.distributed.broadcast(buffer, src=0)
    # Provenance per rank: which shards it read, and a digest of its final weights.
    digest = hashlib.sha256()
    for key, value in sorted(trainable().items()):
        digest.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    write_data_record(run_dir, rank, world, meter.shards_read, counters, weights_sha256=digest.hexdigest())
    if main:
        _finish(recipe, core.student, teacher, cache, run_dir, step, world, counters)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _finish(
    recipe: DistillRecipe,
    student: nn.Module,
    teacher: Any,
    cache: Any,
    run_dir: Path,
    steps: int,
    world: int,
    counters: dict,
) -> None:
    """Write the student artefact, evaluate and plot (main process)."""
    from kdprompt.models.student import save_student

    student.eval()
    save_student(run_dir, student, recipe=recipe, teacher=teacher, cache=cache, cache_path=cache_of(recipe))
    results: dict[str, Any] = {
        "steps": steps,
        "world_size": world,
        "corrupt_samples": counters["corrupt"],
        "image_tower_parameters": student.image_tower_parameters(),
        "teacher_image_tower_parameters": sum(p.numel() for p in teacher.clip_model.visual.parameters()),
    }
    if recipe.evaluate and teacher.data_config is not None:
        from kdprompt.data.sources import load_split
        from kdprompt.evaluate import evaluate_base_novel, evaluation_table
        from kdprompt.models.student import StudentClassifier

        test = load_split(teacher.data_config, "test")
        rows = [
            evaluate_base_novel(teacher, test, device=teacher.device),
            evaluate_base_novel(StudentClassifier(student, cache), test, device=teacher.device),
        ]
        results["eval"] = rows
        table = evaluation_table(rows)
        write_text_atomic(run_dir / "eval.md", table + "\n")
        tqdm.write("\n" + table)
    write_json_atomic(run_dir / "metrics.json", results)
    names = ["loss", *recipe.objectives, "lr"]
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", names, title=f"distill {recipe.name}")
