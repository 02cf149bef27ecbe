"""``kdprompt teacher``: prompt learning (PromptSRC or MaPLe) on few-shot labelled data, then the cache."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kdprompt.config.teacher import TeacherRecipe
from kdprompt.data.augment import train_transform
from kdprompt.data.dataset import SplitDataset
from kdprompt.data.protocol import fewshot_protocol
from kdprompt.data.sources import load_split
from kdprompt.data.types import Split
from kdprompt.errors import KdpromptError
from kdprompt.io import write_json_atomic, write_text_atomic
from kdprompt.models.loading import create_clip
from kdprompt.models.prompt_methods import TeacherOutputs
from kdprompt.models.teacher import PromptedClip, save_teacher
from kdprompt.train.checkpoint import Checkpoint, restore_rng_on_resume
from kdprompt.train.metrics import plot_curves
from kdprompt.train.run import Run, Stage, run_stage
from kdprompt.train.runtime import ImageRate, resolve_pin_memory, scheduled_lr
from kdprompt.train.selection import BestOnVal, load_labelled_val, val_accuracy


def run_dir_of(recipe: TeacherRecipe) -> Path:
    """``<output_dir>/<name>/teacher``."""
    return Path(recipe.output_dir) / recipe.name / "teacher"


def cache_dir_of(recipe: TeacherRecipe) -> Path:
    """Where the teacher's text-feature cache goes (``cache/<name>`` unless set)."""
    return recipe.cache_dir or Path("cache") / recipe.name


def fewshot_splits(recipe: TeacherRecipe) -> tuple[Split, Split | None, list[str]]:
    """The few-shot training split, the optional validation split, and all class names of the data.

    The draw is Dassl's (:func:`~kdprompt.data.protocol.fewshot_protocol`): over all classes, train
    then val from one RNG, then the base half when ``fewshot.classes`` is base.
    """
    train = load_split(recipe.data, "train")
    all_classnames = list(train.classnames)
    val = load_labelled_val(recipe.data) if recipe.selection == "val" else None
    train, val = fewshot_protocol(train, val, recipe.fewshot.shots, recipe.fewshot.classes, recipe.seed)
    if not train.samples:
        raise KdpromptError(
            f"the train split of {recipe.data.source} data has no images of the chosen classes"
        )
    return train, val, all_classnames


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of sample indices for ``epoch``: one seeded permutation split across ranks.

    Every rank gets the same number of batches (the permutation is cut to a multiple of ``world``).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    mine = order[: (n // world) * world][rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def _trainable_state(model: PromptedClip) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.learner.state_dict().items()}


def _prefixed(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


class TeacherStage(Stage):
    """Prompts of a frozen CLIP learn on few-shot labelled images, with the prompt method's own loss."""

    name = "teacher"
    epoch_checkpoints = True

    def run_dir(self) -> Path:
        return run_dir_of(self.recipe)

    def setup(self, run: Run) -> None:
        recipe, cfg = self.recipe, self.recipe.train
        with run.accelerator.main_process_first():
            self.train, self.val, self.all_classnames = fewshot_splits(recipe)
        self.classnames = self.train.classnames
        self.model = PromptedClip(create_clip(recipe.model), recipe.method, name=f"teacher {recipe.name}")
        self.aggregation = self.model.learner.aggregation(cfg.epochs)
        run.per_epoch = math.ceil((len(self.train) // run.world) / cfg.batch_size)
        if run.per_epoch == 0:
            raise KdpromptError(
                f"{len(self.train)} training images cannot be split across {run.world} processes"
            )
        run.total_steps = cfg.max_steps or cfg.epochs * run.per_epoch
        self.optimizer = torch.optim.SGD(
            self.model.learner.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.counters = {}
        self.best = BestOnVal()

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.learner.load_state_dict(_prefixed(ckpt.weights, "learner."))
        self.best.restore(ckpt)
        if self.aggregation is not None:
            self.aggregation.load(_prefixed(ckpt.weights, "gpa."), dict(ckpt.state["counters"]))

    def start(self, run: Run) -> None:
        self.core: PromptedClip = run.accelerator.unwrap_model(self.model)
        self.class_tokens = self.core.class_tokens(self.classnames)
        self.core.learner.prepare_training(self.core, self.classnames)
        augment = train_transform(self.recipe.augmentation, self.core.clip_model.visual.preprocess_cfg)
        self.dataset = SplitDataset(self.train, augment)
        self.rate = ImageRate(run.world)

    def batches(self, run: Run, restored_rng: dict | None) -> Iterator[tuple[int, Any]]:
        cfg, seed, step = self.recipe.train, self.recipe.seed, run.step
        while step < run.stop_at:
            epoch, skip = divmod(step, run.per_epoch)
            batches = epoch_batches(len(self.dataset), cfg.batch_size, seed, epoch, run.rank, run.world)
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches[skip:],
                num_workers=cfg.num_workers,
                pin_memory=resolve_pin_memory(cfg.pin_memory),
            )
            if restored_rng is not None:
                restore_rng_on_resume(restored_rng, run.main, seed + 7919 * run.rank + step)
                restored_rng = None
            for batch in loader:
                yield epoch, batch
                step += 1
                if step >= run.stop_at:
                    return

    def step(self, run: Run, batch: Any) -> dict[str, Tensor]:
        cfg, core = self.recipe.train, self.core
        images, labels = batch[0].to(run.device), batch[1].to(run.device)
        lr = scheduled_lr(cfg, run.step, run.per_epoch, run.total_steps)
        with run.accelerator.autocast():
            image_f, text_f = self.model(images, self.class_tokens)
            scale = core.logit_scale
            logits = scale * image_f @ text_f.T
            terms = core.learner.training_loss(
                core, TeacherOutputs(images, labels, image_f, text_f, logits, scale)
            )
        run.optimizer_step(self.optimizer, terms["loss"], lr)
        self.rate.add(len(labels))
        self.last = (logits.detach(), labels)
        return terms

    def row(self, run: Run, epoch: int, terms: dict[str, Tensor]) -> dict[str, Any]:
        logits, labels = self.last
        acc = (logits.argmax(-1) == labels).float().mean()
        return {
            **run.mean(terms),
            "epoch": epoch,
            "lr": self.lr(),
            "train_acc": 100 * run.accelerator.reduce(acc, "mean").item(),
            "images_per_s": self.rate.per_s(),
        }

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.3f}", "acc": f"{row['train_acc']:.0f}"}

    def epoch_end(self, run: Run) -> None:
        finished = run.step // run.per_epoch  # 1-based number of the epoch just finished
        if self.aggregation is not None:
            self.aggregation.epoch_end(finished, self.core.learner.state_dict())
        if self.val is not None:
            acc = val_accuracy(self.core, self.val, run.device, self.core)
            self.best.update(run, acc, lambda: _trainable_state(self.core))

    def tensors(self) -> dict[str, Tensor]:
        out = {f"learner.{k}": v for k, v in _trainable_state(self.core).items()}
        out.update(
            {f"gpa.{k}": v for k, v in (self.aggregation.tensors() if self.aggregation else {}).items()}
        )
        out.update(self.best.tensors())
        return out

    def checkpoint_counters(self) -> dict[str, Any]:
        aggregation = self.aggregation.counters() if self.aggregation else {}
        return {**self.counters, **self.best.counters(), **aggregation}

    def checkpoint_meta(self, run: Run, epoch_end: bool) -> dict[str, Any]:
        return {"epoch_end": epoch_end}

    def final_state(self) -> tuple[dict, str]:
        """The prompts the teacher ships: best-on-val, the method's aggregate (PromptSRC's GPA), or the last."""
        if self.recipe.selection == "val" and self.best.state is not None:
            return self.best.state, self.best.describe()
        aggregated = self.aggregation.result() if self.aggregation is not None else None
        if aggregated is not None:
            return aggregated, "gpa"
        return _trainable_state(self.core), "last"

    def finish(self, run: Run) -> None:
        final, selected = self.final_state()
        self.core.learner.load_state_dict(final)
        if run.main:
            _finish(self, run.run_dir, selected, run.step)


def run_teacher(recipe: TeacherRecipe) -> Path:
    """Train the teacher, write its artefact and text-feature cache, and evaluate; returns the run dir."""
    if not recipe.model.pretrained:
        raise KdpromptError(
            "model.pretrained is not set: a teacher needs base weights that can be loaded again "
            "(an open_clip tag such as `openai`, or a weights file); a random initialisation cannot be rebuilt"
        )
    return run_stage(TeacherStage(recipe))


def _finish(stage: TeacherStage, run_dir: Path, selected: str, steps: int) -> None:
    """Write the artefact, the cache of all classes, the evaluation and the curves (main process)."""
    from kdprompt.text_features.teacher import cache_class_features

    recipe, core, all_classnames = stage.recipe, stage.core, stage.all_classnames
    core.eval()
    fingerprint = save_teacher(
        run_dir,
        core,
        classnames=stage.classnames,
        all_classnames=all_classnames,
        extra={
            "data": recipe.data.model_dump(mode="json"),
            "fewshot": recipe.fewshot.model_dump(mode="json"),
            "seed": recipe.seed,
            "selection": selected,
            "train_images": len(stage.train),
            "steps": steps,
        },
    )
    cache_dir = cache_dir_of(recipe)
    cache_class_features(
        core,
        all_classnames,
        cache_dir,
        teacher_fingerprint=fingerprint,
        provenance={
            "teacher": str(run_dir),
            "model": core.spec.model_dump(mode="json"),
            "method": recipe.method.name,
        },
    )
    results: dict[str, Any] = {
        "fingerprint": fingerprint,
        "selection": selected,
        "steps": steps,
        "cache": str(cache_dir),
    }
    if recipe.evaluate:
        from kdprompt.evaluate import ZeroShotClassifier, evaluate_base_novel, evaluation_table

        test = load_split(recipe.data, "test")
        zero_shot = ZeroShotClassifier(
            create_clip(recipe.model),
            templates=recipe.zero_shot_templates,
            name=f"zero-shot {recipe.model.name}",
            data=recipe.data,
        )
        rows = [
            evaluate_base_novel(zero_shot, test, device=core.device),
            evaluate_base_novel(core, test, device=core.device),
        ]
        results["eval"] = rows
        results["zero_shot_templates"] = recipe.zero_shot_templates
        table = evaluation_table(rows)
        write_text_atomic(run_dir / "eval.md", table + "\n")
        tqdm.write("\n" + table)
    write_json_atomic(run_dir / "metrics.json", results)
    plot_curves(
        run_dir / "metrics.jsonl",
        run_dir / "curves.png",
        ["loss", "train_acc", "val_acc", "lr"],
        title=f"teacher {recipe.name} ({recipe.method.name})",
    )
