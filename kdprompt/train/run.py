"""The run scaffold every training stage shares: one :func:`run_stage` drives pretrain, teacher and distill.

A stage is a :class:`Stage`: a ``setup`` (model, optimizer, data plan), a ``step`` (one optimiser step
on one batch) and a ``finish`` (artefacts, evaluation), plus what it checkpoints. :func:`run_stage` owns
the rest, in this order:

1. the Accelerator (TensorBoard under ``run_dir/tb``); the run lock (``run_dir/run.lock``, taken by the
   main process: a second run of the same directory is refused, see :mod:`kdprompt.train.runlock`) and,
   under it, the removal of temporaries that killed runs left in ``checkpoints/``;
   ``set_seed(recipe.seed)``, ``stage.setup``;
2. resume (``resume: auto | never | <path>``, a checkpoint of another recipe refused): the optimizer,
   the step, the counters and the RNG state here, the stage's own tensors in ``stage.restore``;
3. ``accelerator.prepare(model, optimizer)``, then ``stage.start``;
4. ``recipe.yaml``, ``metrics.jsonl`` (cut back to the resumed step: the rows after it are re-logged),
   the trackers;
5. one ``stage.step`` per batch of ``stage.batches`` up to ``train.stop_after_steps`` more steps or the
   end, with a progress bar, a metrics row every ``train.log_every`` steps, a checkpoint every
   ``checkpoint.every_steps`` (and, for a stage with ``epoch_checkpoints``, a row, ``stage.epoch_end``
   and a checkpoint at every epoch end);
6. a last checkpoint, then ``stage.finish`` unless ``train.stop_after_steps`` ended the run early.

:func:`open_run` is steps 1-3 alone: ``kdprompt bench distill`` times the distill stage's own step on it,
without the lock (it writes nothing, so it is never refused nor in a training run's way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.config.loading import dump_recipe
from kdprompt.errors import KdpromptError
from kdprompt.io import write_text_atomic
from kdprompt.train.checkpoint import (
    Checkpoint,
    clean_stale_temporaries,
    resume_training,
    save_training_checkpoint,
)
from kdprompt.train.metrics import MetricsLog
from kdprompt.train.runlock import RunLock, acquire_run_lock
from kdprompt.train.runtime import (
    StreamMeter,
    apply_throughput_settings,
    ended_early,
    epoch_plan,
    make_accelerator,
    set_lr,
    stream_steps,
    write_data_record,
)


@dataclass
class Run:
    """One invocation of a stage: where it writes, its accelerator and where it stands.

    Attributes:
        recipe: the resolved recipe (``seed``, ``name``, ``resume``, ``train``, ``checkpoint``).
        run_dir: the run directory (``recipe.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``tb/``).
        accelerator: the run's Accelerator.
        total_steps: optimiser steps of the whole run (set by ``Stage.setup``).
        per_epoch: optimiser steps per epoch (set by ``Stage.setup``).
        step: optimiser steps taken so far (the resumed step at the start).
        stop_at: the step this invocation ends at (``train.stop_after_steps`` more, at most the total).
        fingerprint: the recipe fingerprint written into (and checked against) checkpoints.
        metrics: the metrics log (None until the run directory is written).
        lock: the run lock on the main process of a locked run (see :func:`open_run`), else None.
    """

    recipe: Any
    run_dir: Path
    accelerator: Accelerator
    total_steps: int = 0
    per_epoch: int = 1
    step: int = 0
    stop_at: int = 0
    fingerprint: str = ""
    metrics: MetricsLog | None = None
    lock: RunLock | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def mean(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Each term averaged over the ranks (every rank calls this together)."""
        return {k: self.accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        loss: Tensor,
        lr: float,
        clip: tuple[Any, float] | None = None,
    ) -> None:
        """One optimiser step on ``loss`` at learning rate ``lr``; ``clip=(parameters, max_norm)`` clips first."""
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if clip is not None:
            self.accelerator.clip_grad_norm_(*clip)
        optimizer.step()


class Stage:
    """A training stage run by :func:`run_stage`. Subclasses set ``name`` and implement the hooks.

    ``setup`` sets ``model`` (what ``accelerator.prepare`` wraps; ``model.train()`` is called before the
    first step), ``optimizer`` and ``counters`` (JSON-able numbers carried through checkpoints), and the
    run's ``total_steps`` and ``per_epoch``.
    """

    name: ClassVar[str]
    epoch_checkpoints: ClassVar[bool] = False  # also log, call epoch_end and checkpoint at every epoch end
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe
        self.counters: dict[str, Any] = {}

    def run_dir(self) -> Path:
        """Where the run writes."""
        raise NotImplementedError

    def setup(self, run: Run) -> None:
        """Build the model, optimizer and data plan (after ``set_seed``; keep the RNG order of a run)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """The fingerprint a checkpoint must carry to be resumed (after ``setup``)."""
        return recipe_fingerprint(self.recipe)

    def restore(self, ckpt: Checkpoint) -> None:
        """Load the stage's tensors from a checkpoint (before ``accelerator.prepare``)."""
        raise NotImplementedError

    def start(self, run: Run) -> None:
        """After ``accelerator.prepare``: what the steps need from the prepared model."""

    def batches(self, run: Run, restored_rng: dict | None) -> Iterator[tuple[int, Any]]:
        """``(epoch, batch)`` for steps ``run.step .. run.stop_at - 1``; restore ``restored_rng`` (when not
        None) just before drawing the first one, as :func:`~kdprompt.train.checkpoint.restore_rng_on_resume`."""
        raise NotImplementedError

    def step(self, run: Run, batch: Any) -> dict[str, Tensor]:
        """One optimiser step at ``run.step`` (not yet incremented); returns the loss terms."""
        raise NotImplementedError

    def row(self, run: Run, epoch: int, terms: dict[str, Tensor]) -> dict[str, Any]:
        """The metrics row after a step (every rank calls this together)."""
        raise NotImplementedError

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a row."""
        return {}

    def epoch_end(self, run: Run) -> None:
        """After the step that ends an epoch, before its checkpoint (with ``epoch_checkpoints``)."""

    def tensors(self) -> dict[str, Tensor]:
        """The tensors a checkpoint holds (called on the main process only)."""
        raise NotImplementedError

    def checkpoint_counters(self) -> dict[str, Any]:
        return self.counters

    def checkpoint_meta(self, run: Run, epoch_end: bool) -> dict[str, Any]:
        """Stage fields of a checkpoint's ``meta.json`` (before ``total_steps`` and ``recipe_fingerprint``)."""
        return {}

    def finish(self, run: Run) -> None:
        """After the last step of a run that was not stopped early: artefacts, evaluation, curves."""

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class StreamStage(Stage):
    """A stage streaming webdataset shards (pretrain, distill): counts samples, corrupt samples and the
    shards each rank read (``data/rank<r>.json``)."""

    meter: StreamMeter

    def plan(self, run: Run) -> None:
        """Size the run from its shards (in ``setup``): ``urls``, ``samples``, steps per epoch and in all."""
        self.urls, self.samples, run.per_epoch, run.total_steps = epoch_plan(
            self.recipe, run.world, run.accelerator
        )
        self.counters = {"corrupt": 0, "samples": 0}

    def transform(self) -> Callable[[Any], Tensor]:
        """The training transform of the streamed images (after ``start``)."""
        raise NotImplementedError

    def start(self, run: Run) -> None:
        self.meter = StreamMeter(self.counters, run.world)

    def batches(self, run: Run, restored_rng: dict | None) -> Iterator[tuple[int, Any]]:
        return stream_steps(
            self.urls,
            self.recipe.train,
            self.transform(),
            seed=self.recipe.seed,
            step=run.step,
            stop_at=run.stop_at,
            per_epoch=run.per_epoch,
            rank=run.rank,
            world=run.world,
            restored_rng=restored_rng,
            main=run.main,
        )

    def write_data_record(self, run: Run, **extra: Any) -> None:
        write_data_record(run.run_dir, run.rank, run.world, self.meter.shards_read, self.counters, **extra)


def _claim(run: Run) -> None:
    """Take the run lock on the main process and clear dead writers' temporaries under it.

    Every rank calls this together: a refusal on the main process is broadcast, so the other ranks fail
    with the same message instead of waiting for it at the next barrier.
    """
    refusal = None
    if run.main:
        try:
            run.lock = acquire_run_lock(run.run_dir)
            clean_stale_temporaries(run.ckpt_dir)
        except KdpromptError as err:
            refusal = str(err)
        except OSError as err:  # e.g. a read-only output_dir: still one line, on every rank
            refusal = (
                f"cannot lock the run directory {run.run_dir} ({err}); check output_dir and its permissions"
            )
    (refusal,) = broadcast_object_list([refusal])
    if refusal is not None:
        if run.lock is not None:
            run.lock.release()
        _leave_process_group()
        raise KdpromptError(refusal)


def _leave_process_group() -> None:
    """Let every rank leave together before one of them exits with an error.

    Without it the main process (which hosts the rendezvous store) can exit while another rank is still
    finishing the broadcast, and that rank dies by SIGABRT instead of exiting with the error.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def open_run(
    stage: Stage, *, resume: bool = True, tensorboard: bool = True, lock: bool = False
) -> tuple[Run, dict | None]:
    """Accelerator, (lock), seed, ``stage.setup``, resume, ``accelerator.prepare`` and ``stage.start``.

    Returns the run (``step`` and ``stop_at`` set) and the RNG state to restore before the next batch
    (None for a fresh run). Nothing is written to the run directory, except with ``lock``: then the main
    process holds ``run_dir/run.lock`` (``run.lock``; release it when done) and has removed stale
    checkpoint temporaries, or every rank raises :class:`KdpromptError` naming the run holding it.
    """
    recipe = stage.recipe
    run_dir = stage.run_dir()
    run = Run(recipe, run_dir, make_accelerator(run_dir, recipe.train.mixed_precision, tensorboard))
    if lock:
        _claim(run)
    try:
        return _open(stage, run, resume)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise


def _open(stage: Stage, run: Run, resume: bool) -> tuple[Run, dict | None]:
    recipe = stage.recipe
    set_seed(recipe.seed)
    stage.setup(run)
    run.fingerprint = stage.fingerprint()
    restored_rng = None
    if resume:
        ckpt = resume_training(recipe.resume, run.ckpt_dir, run.fingerprint, stage.optimizer, main=run.main)
        if ckpt is not None:
            stage.restore(ckpt)
            run.step, restored_rng = ckpt.step, ckpt.state["rng"]
            stage.counters = dict(ckpt.state["counters"])
    stage.model, stage.optimizer = run.accelerator.prepare(stage.model, stage.optimizer)
    apply_throughput_settings(stage.model, recipe.train, run.device)
    stage.start(run)
    stop_after = recipe.train.stop_after_steps
    run.stop_at = min(run.total_steps, run.step + stop_after) if stop_after else run.total_steps
    return run, restored_rng


def _checkpoint(stage: Stage, run: Run, epoch_end: bool) -> None:
    meta = {
        **stage.checkpoint_meta(run, epoch_end),
        "total_steps": run.total_steps,
        "recipe_fingerprint": run.fingerprint,
    }
    save_training_checkpoint(
        run.accelerator,
        run.ckpt_dir,
        run.step,
        stage.tensors,
        stage.optimizer,
        stage.checkpoint_counters(),
        meta,
        stage.recipe.checkpoint.keep_last,
    )


def run_stage(stage: Stage) -> Path:
    """Run ``stage`` from its recipe (resuming its latest checkpoint by default); returns the run directory.

    Raises:
        KdpromptError: another run holds the run directory, or the checkpoint to resume is unusable.
    """
    run, restored_rng = open_run(stage, lock=True)
    try:
        return _train(stage, run, restored_rng)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(stage: Stage, run: Run, restored_rng: dict | None) -> Path:
    recipe, accelerator = stage.recipe, run.accelerator
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.run_dir / "recipe.yaml", dump_recipe(recipe))
    run.metrics = MetricsLog(run.run_dir / "metrics.jsonl", accelerator)
    run.metrics.truncate_after(run.step)
    accelerator.init_trackers(stage.name)

    log_every, every_steps = recipe.train.log_every, recipe.checkpoint.every_steps
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        disable=not run.main,
        desc=f"{stage.name} {recipe.name}",
        unit="step",
    )
    stage.model.train()
    for epoch, batch in stage.batches(run, restored_rng):
        terms = stage.step(run, batch)
        run.step += 1
        bar.update(1)
        epoch_end = stage.epoch_checkpoints and run.step % run.per_epoch == 0  # only where it counts
        if run.step % log_every == 0 or run.step == run.total_steps or epoch_end:
            row = stage.row(run, epoch, terms)
            run.metrics.log(row, run.step)
            bar.set_postfix(**stage.postfix(row))
        if epoch_end:
            stage.epoch_end(run)
        if run.step < run.stop_at and (epoch_end or (every_steps and run.step % every_steps == 0)):
            _checkpoint(stage, run, epoch_end)
    bar.close()
    _checkpoint(stage, run, run.step % run.per_epoch == 0)
    if ended_early(run.step, run.total_steps, accelerator):
        return run.run_dir
    stage.finish(run)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.run_dir
