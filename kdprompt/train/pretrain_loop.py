"""``kdprompt pretrain``: contrastive CLIP training (open_clip's loss, learnable logit scale) on shards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from kdprompt.config.common import ZeroShotEval
from kdprompt.config.pretrain import PretrainRecipe
from kdprompt.data.protocol import subsample_classes
from kdprompt.data.sources import load_split
from kdprompt.errors import KdpromptError
from kdprompt.evaluate import zero_shot_accuracy
from kdprompt.io import write_json_atomic
from kdprompt.models.loading import create_clip, save_clip_weights
from kdprompt.models.templates import template_set
from kdprompt.train.checkpoint import Checkpoint
from kdprompt.train.metrics import plot_curves, read_jsonl
from kdprompt.train.run import Run, StreamStage, run_stage
from kdprompt.train.runtime import cosine_lr, decay_groups

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
            clip.model,
            clip.tokenizer,
            clip.preprocess_val,
            split,
            template_set(ev.templates, ev.data),
            device,
        )
    return results


class ClipStage(StreamStage):
    """A stage whose product is a whole CLIP (``pretrain``, ``clipkd``): its checkpoints hold ``core``,
    and it ends exported (open_clip weights), evaluated zero-shot (``self.clip``) and plotted."""

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.3f}", "img_s": f"{row['images_per_s']:.0f}"}

    def tensors(self) -> dict[str, Tensor]:
        return self.core.state_dict()

    def checkpoint_meta(self, run: Run, epoch_end: bool) -> dict[str, Any]:
        return {"epoch": run.step // run.per_epoch}

    def finish_clip(
        self,
        run: Run,
        model: nn.Module,
        details: dict[str, Any],
        curves: list[str],
        terms: tuple[str, ...] = (),
    ) -> None:
        """Write every rank's data record; on the main process save ``model`` (the run's
        ``model.safetensors`` and the recipe's ``export``), evaluate it and write ``metrics.json``
        (``details`` added, and the last logged value of each loss term of ``terms`` as ``final_terms``)
        and the curves of ``curves``."""
        recipe = self.recipe
        self.write_data_record(run)
        if not run.main:
            return
        save_clip_weights(model, run.run_dir / "model.safetensors")
        if recipe.export is not None:
            save_clip_weights(model, recipe.export)
        rows = read_jsonl(run.run_dir / "metrics.jsonl")
        results: dict[str, Any] = {
            "steps": run.step,
            "world_size": run.world,
            "samples_per_epoch": self.samples,
            **details,
            "final_loss": rows[-1]["loss"] if rows else None,
            "corrupt_samples": rows[-1]["corrupt_samples"] if rows else 0,
        }
        if terms:
            results["final_terms"] = {k: rows[-1][k] for k in terms} if rows else {}
        model.eval()
        results["zero_shot_top1"] = evaluate_zero_shot(self.clip, recipe.eval, run.device)
        write_json_atomic(run.run_dir / "metrics.json", results)
        plot_curves(
            run.run_dir / "metrics.jsonl",
            run.run_dir / "curves.png",
            curves,
            title=f"{recipe.recipe} {recipe.name}",
        )


class PretrainStage(ClipStage):
    """The whole CLIP trains on image-text shards with open_clip's contrastive loss."""

    name = "pretrain"

    def run_dir(self) -> Path:
        return run_dir_of(self.recipe)

    def setup(self, run: Run) -> None:
        cfg = self.recipe.train
        self.clip = create_clip(self.recipe.model)
        self.model = self.clip.model
        self.plan(run)
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
        )

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.weights)

    def start(self, run: Run) -> None:
        super().start(run)
        self.core = run.accelerator.unwrap_model(self.model)
        self.loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=run.rank, world_size=run.world)

    def transform(self) -> Any:
        return self.clip.preprocess_train

    def step(self, run: Run, batch: dict) -> dict[str, Tensor]:
        cfg = self.recipe.train
        images = batch["image"].to(run.device, non_blocking=True)
        tokens = self.clip.tokenizer(batch["text"]).to(run.device)
        with run.accelerator.autocast():
            image_f, text_f, scale = self.model(images, tokens)[:3]
            loss = self.loss_fn(image_f, text_f, scale)
        lr = cosine_lr(run.step, run.total_steps, cfg.lr, cfg.warmup_steps)
        clip_grad = (self.model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        run.optimizer_step(self.optimizer, loss, lr, clip_grad)
        with torch.no_grad():
            self.core.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.meter.record(batch)
        return {"loss": loss, "logit_scale": scale}

    def row(self, run: Run, epoch: int, terms: dict[str, Tensor]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "loss": run.mean({"loss": terms["loss"]})["loss"],
            "lr": self.lr(),
            "logit_scale": terms["logit_scale"].detach().float().item(),
            **self.meter.window(run.accelerator),
        }

    def finish(self, run: Run) -> None:
        """Export the weights, evaluate zero-shot and plot (main process); every rank's data record."""
        self.finish_clip(run, self.core, {}, ["loss", "logit_scale", "lr"])


def run_pretrain(recipe: PretrainRecipe) -> Path:
    """Train, checkpoint, export and evaluate; returns the run directory."""
    return run_stage(PretrainStage(recipe))
