"""What the training stages share below the run scaffold (:mod:`kdprompt.train.run`): the Accelerator, the
learning-rate schedule, parameter groups, images/s, and the shard stream of pretrain and distill."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import nn


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


def resolve_pin_memory(setting: bool | str) -> bool:
    """``train.pin_memory``: ``auto`` (or true) pins loader batches when CUDA is available; never on CPU."""
    # Pinning needs a CUDA context; on CPU there is no host-to-device copy to speed up.
    return setting is not False and torch.cuda.is_available()


def apply_throughput_settings(model: nn.Module, cfg: Any, device: torch.device) -> dict[str, bool]:
    """Apply a train config's ``allow_tf32``, ``channels_last`` and ``compile`` to ``model``, in place.

    Called once, after ``accelerator.prepare`` (so a compile wraps DDP, as torch advises). TF32 is a
    process-wide CUDA switch (matmuls and cuDNN convolutions), left alone on CPU. ``channels_last``
    converts the model's 4-D weights (the patch embedding of a ViT, every convolution of a ResNet);
    ``compile`` uses :meth:`torch.nn.Module.compile`, which keeps the module's class and state-dict keys
    (the graph is built on the first step). Both apply on any device but pay off on CUDA; on CPU, what
    helps is ``num_workers`` (decoding beside the step).

    Returns:
        Each setting and whether it is in effect: ``{"allow_tf32", "channels_last", "compile"}``.
    """
    applied = {"allow_tf32": False, "channels_last": False, "compile": False}
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.allow_tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
        applied["allow_tf32"] = cfg.allow_tf32
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if cfg.compile:
        model.compile()
        applied["compile"] = True
    return applied


def cosine_lr(
    step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, warmup_lr: float = 0.0
) -> float:
    """Learning rate at ``step`` (0-based): constant ``warmup_lr`` (or linear ramp when 0) then cosine to 0."""
    if step < warmup_steps:
        return warmup_lr if warmup_lr > 0 else base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def dassl_epoch_lr(
    epoch: int, epochs: int, base_lr: float, warmup_epochs: int = 0, warmup_lr: float = 0.0
) -> float:
    """Learning rate of ``epoch`` (0-based) under Dassl's cosine schedule with a constant warm-up.

    Dassl (``dassl/optim/lr_scheduler.py``) wraps ``CosineAnnealingLR(T_max=epochs)`` in a
    ``ConstantWarmupScheduler``; with ``WARMUP_RECOUNT`` left at its default (True,
    ``dassl/config/defaults.py``) the cosine starts counting only after the warm-up. The trainers step it
    once, after an epoch's last batch (PromptKD ``trainers/promptkd.py``, PromptSRC
    ``trainers/promptsrc.py``, MaPLe ``trainers/maple.py``: ``update_lr`` when
    ``batch_idx + 1 == num_batches``). So the first ``warmup_epochs`` epochs run at ``warmup_lr``,
    epoch ``e`` after them at ``base · (1 + cos(π (e - warmup_epochs) / epochs)) / 2``: the cosine's
    period counts the warm-up epochs too, so it never reaches 0 (the last epoch of 5 with one warm-up
    runs at 0.35 of base).
    """
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def scheduled_lr(cfg: Any, step: int, per_epoch: int, total_steps: int) -> float:
    """Learning rate at ``step`` (0-based) under ``cfg.lr_schedule``.

    ``cfg`` is a train config with ``lr``, ``warmup_epochs``, ``warmup_lr`` and ``lr_schedule``:
    ``cosine_per_step`` is :func:`cosine_lr` over steps (warm-up ``warmup_epochs`` epochs of steps);
    ``dassl`` is :func:`dassl_epoch_lr`, constant within an epoch, over the run's epochs (``epochs``, or
    fewer when ``max_steps`` stops earlier).
    """
    if cfg.lr_schedule == "dassl":
        epochs = math.ceil(total_steps / per_epoch)
        return dassl_epoch_lr(step // per_epoch, epochs, cfg.lr, cfg.warmup_epochs, cfg.warmup_lr)
    return cosine_lr(step, total_steps, cfg.lr, cfg.warmup_epochs * per_epoch, cfg.warmup_lr)


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


def epoch_plan(recipe: Any, world: int, accelerator: Accelerator) -> tuple[list[str], int, int, int]:
    """The shards a streaming run reads and its schedule: ``(urls, samples, batches per epoch, total steps)``.

    ``recipe`` has ``data``, ``split``, ``shards_dir``, ``shard_maxcount`` and a ``train`` config with
    ``batch_size``, ``max_steps`` and ``epochs``. A non-shard source is written to shards once (by the
    main process first).

    Raises:
        KdpromptError: the shards have no ``sizes.json``, so an epoch cannot be sized.
    """
    from kdprompt.data.materialize import shards_for
    from kdprompt.data.shard_reader import batches_per_epoch_for
    from kdprompt.data.shard_urls import read_sizes
    from kdprompt.errors import KdpromptError

    with accelerator.main_process_first():
        urls = shards_for(recipe.data, recipe.split, recipe.shards_dir, recipe.shard_maxcount)
    n_samples = read_sizes(urls)
    if n_samples is None:
        raise KdpromptError(
            f"no sizes.json beside the shards {urls[0]} ...: cannot size an epoch; "
            "write shards with `kdprompt shards` or add a sizes.json"
        )
    cfg = recipe.train
    per_epoch = batches_per_epoch_for(n_samples, cfg.batch_size, world)
    return urls, n_samples, per_epoch, cfg.max_steps or cfg.epochs * per_epoch


def stream_steps(
    urls: list[str],
    cfg: Any,
    transform: Any,
    *,
    seed: int,
    step: int,
    stop_at: int,
    per_epoch: int,
    rank: int,
    world: int,
    restored_rng: dict | None = None,
    main: bool = True,
) -> Iterator[tuple[int, dict]]:
    """This rank's ``(epoch, batch)`` for steps ``step .. stop_at - 1``, one shard epoch at a time.

    A resumed run (``step`` > 0) replays its epoch's data position, then restores the checkpoint's RNG
    state (``restored_rng``) so the next batch's augmentations match the interrupted run. The caller
    takes one optimiser step per batch; no batch is drawn after the last one.

    ``cfg`` is a train config with ``batch_size``, ``shuffle_buffer``, ``shard_interleave``, ``resampled``,
    ``num_workers`` and ``pin_memory``.
    """
    from kdprompt.data.shard_reader import make_loader
    from kdprompt.train.checkpoint import restore_rng_on_resume

    while step < stop_at:
        epoch, skip = divmod(step, per_epoch)
        loader = make_loader(
            urls,
            batch_size=cfg.batch_size,
            transform=transform,
            shuffle_buffer=cfg.shuffle_buffer,
            interleave=cfg.shard_interleave,
            seed=seed,
            epoch=epoch,
            resampled=cfg.resampled,
            batches_per_epoch=per_epoch,
            num_workers=cfg.num_workers,
            pin_memory=resolve_pin_memory(cfg.pin_memory),
            rank=rank,
            world_size=world,
        )
        batches = iter(loader)
        for _ in range(skip):  # replay the data position of a resumed run
            next(batches)
        if restored_rng is not None:
            restore_rng_on_resume(restored_rng, main, seed + 7919 * rank + step)
            restored_rng = None
        for batch in batches:
            yield epoch, batch
            step += 1
            if step >= stop_at:
                return


class ImageRate:
    """Images per second over a log window, counting every rank's images (``world`` x this rank's)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._window_start, self._window_images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        """Count this rank's ``images`` of one batch."""
        self._window_images += images * self.world

    def per_s(self) -> float:
        """Images/s since the last call (or the start); starts a new window."""
        rate = self._window_images / max(time.perf_counter() - self._window_start, 1e-9)
        self._window_start, self._window_images = time.perf_counter(), 0
        return rate


class StreamMeter(ImageRate):
    """What a shard-streaming loop counts: samples, corrupt samples, shards read, images/s per log window.

    Args:
        counters: ``{"corrupt": int, "samples": int}``, updated in place (checkpointed by the caller).
        world: processes; images/s counts every rank's images.
    """

    def __init__(self, counters: dict[str, int], world: int) -> None:
        super().__init__(world)
        self.counters = counters
        self.shards_read: set[str] = set()

    def record(self, batch: dict) -> None:
        """Count one batch from :func:`stream_steps`."""
        self.counters["corrupt"] += int(batch["corrupt"])
        self.counters["samples"] += len(batch["key"])
        self.shards_read.update(batch["url"])
        self.add(len(batch["key"]))

    def window(self, accelerator: Accelerator) -> dict[str, float | int]:
        """``images_per_s`` since the last call and ``corrupt_samples`` over all ranks; starts a new window."""
        images_per_s = self.per_s()
        corrupt = torch.tensor(self.counters["corrupt"], device=accelerator.device)
        return {"images_per_s": images_per_s, "corrupt_samples": int(accelerator.reduce(corrupt, "sum"))}


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
