"""``kdprompt pretrain``: contrastive CLIP training (open_clip's loss, learnable logit scale) on shards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from kdprompt.config.common import ZeroShotEval
from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.config.loading import dump_recipe
from kdprompt.config.pretrain import PretrainRecipe
from kdprompt.data.protocol import subsample_classes
from kdprompt.data.sources import load_split
from kdprompt.errors import KdpromptError
from kdprompt.evaluate import zero_shot_accuracy
from kdprompt.io import write_json_atomic, write_text_atomic
from kdprompt.models.loading import create_clip, save_clip_weights
from kdprompt.models.templates import TEMPLATE_SETS
from kdprompt.train.checkpoint import resume_training, save_training_checkpoint
from kdprompt.train.metrics import MetricsLog, plot_curves, read_jsonl
from kdprompt.train.runtime import (
    StreamMeter,
    cosine_lr,
    decay_groups,
    ended_early,
    epoch_plan,
    make_accelerator,
    set_lr,
    stream_steps,
    write_data_record,
)

MAX_LOGIT_SCALE = math.log(100.0)


def run_dir_of(recipe: PretrainRecipe) -> Path:
    """``<output_dir>/<name>/pretrain``."""
    return Path(recipe.output_dir) / recipe.name / "pretrain"


def evaluate_zero_shot(clip: Any, evals: list[ZeroShotEval], device: torch.device) -> dict[str, float]:
    """Zero-shot top-1 (%) of ``clip`` on each configured split."""
    results = {}
    for ev in evals:
        split = load_split(ev.data, ev.split)
        if ev.classes != "all":
            split = subsample_classes(split, ev.classes)
        if len(split) == 0:
            raise KdpromptError(f"eval {ev.name!r}: split {ev.split!r} of {ev.data.source} data is empty")
        results[ev.name] = zero_shot_accuracy(
            clip.model, clip.tokenizer, clip.preprocess_val, split, TEMPLATE_SETS[ev.templates], device
        )
    return results


def run_pretrain(recipe: PretrainRecipe) -> Path:
    """Train, checkpoint, export and evaluate; returns the run directory."""
    run_dir = run_dir_of(recipe)
    accelerator = make_accelerator(run_dir, recipe.train.mixed_precision)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(recipe.seed)
    clip = create_clip(recipe.model)
    model = clip.model
    cfg = recipe.train

    urls, n_samples, per_epoch, total_steps = epoch_plan(recipe, world, accelerator)

    optimizer = torch.optim.AdamW(
        decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    ckpt_dir = run_dir / "checkpoints"
    fingerprint = recipe_fingerprint(recipe)
    step, counters, restored_rng = 0, {"corrupt": 0, "samples": 0}, None
    ckpt = resume_training(recipe.resume, ckpt_dir, fingerprint, optimizer, main=main)
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
        step, counters, restored_rng = ckpt.step, dict(ckpt.state["counters"]), ckpt.state["rng"]
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator)
    metrics.truncate_after(step)
    accelerator.init_trackers("pretrain")

    def checkpoint() -> None:
        save_training_checkpoint(
            accelerator,
            ckpt_dir,
            step,
            lambda: accelerator.unwrap_model(model).state_dict(),
            optimizer,
            counters,
            {"epoch": step // per_epoch, "total_steps": total_steps, "recipe_fingerprint": fingerprint},
            recipe.checkpoint.keep_last,
        )

    stop_at = min(total_steps, step + cfg.stop_after_steps) if cfg.stop_after_steps else total_steps
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc=f"pretrain {recipe.name}", unit="step")
    meter = StreamMeter(counters, world)
    model.train()
    batches = stream_steps(
        urls,
        cfg,
        clip.preprocess_train,
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
        images = batch["image"].to(accelerator.device, non_blocking=True)
        tokens = clip.tokenizer(batch["text"]).to(accelerator.device)
        with accelerator.autocast():
            image_f, text_f, scale = model(images, tokens)[:3]
            loss = loss_fn(image_f, text_f, scale)
        set_lr(optimizer, cosine_lr(step, total_steps, cfg.lr, cfg.warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            accelerator.unwrap_model(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        step += 1
        meter.record(batch)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            row = {
                "epoch": epoch,
                "loss": accelerator.reduce(loss.detach().float(), "mean").item(),
                "lr": optimizer.param_groups[0]["lr"],
                "logit_scale": scale.detach().float().item(),
                **meter.window(accelerator),
            }
            metrics.log(row, step)
            bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}")
        if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0 and step < stop_at:
            checkpoint()
    bar.close()
    checkpoint()
    if ended_early(step, total_steps, accelerator):
        return run_dir
    write_data_record(run_dir, rank, world, meter.shards_read, counters)
    results: dict[str, Any] = {"steps": step, "world_size": world, "samples_per_epoch": n_samples}
    if main:
        final = accelerator.unwrap_model(model)
        save_clip_weights(final, run_dir / "model.safetensors")
        if recipe.export is not None:
            save_clip_weights(final, recipe.export)
        rows = read_jsonl(run_dir / "metrics.jsonl")
        results["final_loss"] = rows[-1]["loss"] if rows else None
        results["corrupt_samples"] = rows[-1]["corrupt_samples"] if rows else 0
        final.eval()
        results["zero_shot_top1"] = evaluate_zero_shot(clip, recipe.eval, accelerator.device)
        write_json_atomic(run_dir / "metrics.json", results)
        plot_curves(
            run_dir / "metrics.jsonl",
            run_dir / "curves.png",
            ["loss", "logit_scale", "lr"],
            title=f"pretrain {recipe.name}",
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
