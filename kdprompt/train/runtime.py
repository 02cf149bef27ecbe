"""What every training loop shares: the Accelerator, the learning-rate schedule, parameter groups."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, else ``no``."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(run_dir: Path, mixed_precision: str = "auto", tensorboard: bool = True) -> Accelerator:
    """One Accelerator per run, logging TensorBoard events under ``run_dir/tb``."""
    # Keep CPU runs light on a small machine: torch defaults to every core for every process.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(mixed_precision),
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tb")),
    )
    return accelerator


def cosine_lr(
    step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, warmup_lr: float = 0.0
) -> float:
    """Learning rate at ``step`` (0-based): constant ``warmup_lr`` (or linear ramp when 0) then cosine to 0."""
    if step < warmup_steps:
        return warmup_lr if warmup_lr > 0 else base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, embeddings and the logit scale (as open_clip does)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        exclude = exclude or "embedding" in name or "class_embedding" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def shard_epoch(
    urls: list[str],
    cfg: Any,
    transform: Any,
    *,
    seed: int,
    epoch: int,
    skip: int,
    batches_per_epoch: int,
    rank: int,
    world: int,
) -> Iterator[dict]:
    """This rank's batches of ``epoch`` from the shards, positioned after ``skip`` batches (a resumed run).

    ``cfg`` is a train config with ``batch_size``, ``shuffle_buffer``, ``resampled`` and ``num_workers``.
    """
    from kdprompt.data.shards import make_loader

    loader = make_loader(
        urls,
        batch_size=cfg.batch_size,
        transform=transform,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=seed,
        epoch=epoch,
        resampled=cfg.resampled,
        batches_per_epoch=batches_per_epoch,
        num_workers=cfg.num_workers,
        rank=rank,
        world_size=world,
    )
    batches = iter(loader)
    for _ in range(skip):  # replay the data position of a resumed run
        next(batches)
    return batches


def ended_early(step: int, total_steps: int, accelerator: Accelerator) -> bool:
    """True (after saying so and closing the trackers) when ``train.stop_after_steps`` ended the run early."""
    if step >= total_steps:
        return False
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"stopped at step {step}/{total_steps} (train.stop_after_steps); run again to resume")
    accelerator.end_training()
    return True


def write_data_record(
    run_dir: Path, rank: int, world: int, shards: set[str], counters: dict, **extra: Any
) -> None:
    """Per-rank provenance ``data/rank<r>.json``: which shards this process read (ranks read disjoint shards)."""
    from kdprompt.io import write_json_atomic

    write_json_atomic(
        Path(run_dir) / "data" / f"rank{rank}.json",
        {"rank": rank, "world_size": world, "shards": sorted(shards), **extra, **counters},
    )
