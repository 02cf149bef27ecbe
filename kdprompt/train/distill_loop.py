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
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdprompt.config.distill import DistillRecipe
from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.io import write_json_atomic, write_text_atomic
from kdprompt.train.checkpoint import Checkpoint
from kdprompt.train.metrics import plot_curves
from kdprompt.train.run import Run, StreamStage, run_stage
from kdprompt.train.runtime import scheduled_lr
from kdprompt.train.selection import BestOnVal, teacher_val_split, val_accuracy, without_best


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


class DistillStage(StreamStage):
    """A student (+ projector and objectives) learns from a frozen teacher on unlabelled shards.

    Args:
        recipe: the distill recipe.
        recompute_text: re-encode the teacher's class texts through its prompted text tower at every step
            instead of reading them from the cache (what the PromptKD reference does; ``kdprompt bench
            distill`` times both).
    """

    name = "distill"

    def __init__(self, recipe: DistillRecipe, recompute_text: bool = False) -> None:
        super().__init__(recipe)
        self.recompute_text = recompute_text
        # selection: val validates at every epoch end, which the scaffold only calls with epoch checkpoints.
        self.epoch_checkpoints = recipe.selection == "val"  # type: ignore[misc]
        self.best = BestOnVal()

    def run_dir(self) -> Path:
        return run_dir_of(self.recipe)

    def setup(self, run: Run) -> None:
        from kdprompt.data.augment import train_transform
        from kdprompt.models.loading import create_clip
        from kdprompt.models.student import Student
        from kdprompt.models.teacher import load_teacher
        from kdprompt.objectives import DistillObjectives
        from kdprompt.text_features import load_cache

        recipe, cfg = self.recipe, self.recipe.train
        self.teacher = teacher = load_teacher(recipe.teacher)
        teacher.requires_grad_(False)
        teacher.eval().to(run.device)
        self.cache = load_cache(cache_of(recipe), expect_fingerprint=teacher.fingerprint, load_index=False)
        self.val = teacher_val_split(teacher) if recipe.selection == "val" else None
        self.text = self.cache.features.to(run.device)
        self.logit_scale = torch.tensor(self.cache.logit_scale, device=run.device)
        student = Student(create_clip(recipe.student.model), recipe.student, out_dim=self.cache.embed_dim)
        self.model = DistillModule(student, DistillObjectives(recipe.objectives))
        # The student's augmented batch, converted, is the teacher's input: both see the same view
        # (as in PromptKD's trainers/promptkd.py, where one batch feeds both models).
        self.augment = train_transform(recipe.augmentation, student.visual.preprocess_cfg)
        teacher_view = train_transform(recipe.augmentation, teacher.clip_model.visual.preprocess_cfg)
        self.to_teacher = view_converter(self.augment, teacher_view)
        self.plan(run)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def fingerprint(self) -> str:
        both = f"{recipe_fingerprint(self.recipe)}|{self.teacher.fingerprint}"
        return hashlib.sha256(both.encode()).hexdigest()[:16]

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(without_best(ckpt.weights), strict=False)
        self.best.restore(ckpt)

    def start(self, run: Run) -> None:
        super().start(run)
        self.core: DistillModule = run.accelerator.unwrap_model(self.model)

    def transform(self) -> Any:
        return self.augment

    def step(self, run: Run, batch: dict) -> dict[str, Tensor]:
        """Teacher image features (no gradients), class text features (cached), one student update."""
        cfg = self.recipe.train
        images = batch["image"].to(run.device, non_blocking=True)
        lr = scheduled_lr(cfg, run.step, run.per_epoch, run.total_steps)
        with run.accelerator.autocast():
            with torch.no_grad():
                text = (
                    self.teacher.class_features(self.cache.classnames).float()
                    if self.recompute_text
                    else self.text
                )
                t = self.teacher.encode_images(self.to_teacher(images)).float()
            terms = self.model(images, t, text, self.logit_scale)
        run.optimizer_step(self.optimizer, terms["loss"], lr)
        self.meter.record(batch)
        return terms

    def row(self, run: Run, epoch: int, terms: dict[str, Tensor]) -> dict[str, Any]:
        return {**run.mean(terms), "epoch": epoch, "lr": self.lr(), **self.meter.window(run.accelerator)}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "img_s": f"{row['images_per_s']:.0f}"}

    def epoch_end(self, run: Run) -> None:
        """``selection: val``: the student's top-1 on the teacher's few-shot val split; keep the best epoch."""
        from kdprompt.models.student import StudentClassifier

        if self.val is None:
            return
        self._sync_buffers(run)  # every rank then measures, and keeps, the same student
        student = self.core.student
        acc = val_accuracy(StudentClassifier(student, self.cache), self.val, run.device, student)
        self.best.update(run, acc, student.trainable_state)

    def tensors(self) -> dict[str, Tensor]:
        state = {f"student.{k}": v for k, v in self.core.student.trainable_state().items()}
        state.update({f"objectives.{k}": v for k, v in self.core.objectives.state_dict().items()})
        state.update(self.best.tensors())
        return state

    def checkpoint_counters(self) -> dict[str, Any]:
        return {**self.counters, **self.best.counters()} if self.val is not None else self.counters

    def selected(self) -> str:
        """Load the student the run ships (the best epoch on val, or the last) and say which."""
        if self.val is None:
            return "last"
        if self.best.state is None:
            return "last (selection: val, but no epoch ended)"
        # The best state holds the trainable tensors only; the frozen rest is the same in every epoch.
        self.core.student.load_state_dict(self.best.state, strict=False)
        return self.best.describe()

    def _sync_buffers(self, run: Run) -> None:
        if run.world > 1:
            # DDP keeps parameters equal but each rank's forwards update its own BatchNorm statistics:
            # adopt rank 0's, so every rank holds the same student. Rank 0's own stream is unchanged.
            for buffer in self.core.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def finish(self, run: Run) -> None:
        self._sync_buffers(run)
        self.selection = self.selected()
        # Provenance per rank: which shards it read, and a digest of its final weights.
        digest = hashlib.sha256()
        for key, value in sorted(self.tensors().items()):
            digest.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
        self.write_data_record(run, weights_sha256=digest.hexdigest())
        if run.main:
            _finish(self, run)


def run_distill(recipe: DistillRecipe) -> Path:
    """Distill, checkpoint, write the student artefact and evaluate; returns the run directory."""
    return run_stage(DistillStage(recipe))


def _finish(stage: DistillStage, run: Run) -> None:
    """Write the student artefact, evaluate and plot (main process)."""
    from kdprompt.models.student import save_student

    recipe, student, teacher, cache, run_dir = (
        stage.recipe,
        stage.core.student,
        stage.teacher,
        stage.cache,
        run.run_dir,
    )
    student.eval()
    save_student(
        run_dir,
        student,
        recipe=recipe,
        teacher=teacher,
        cache=cache,
        cache_path=cache_of(recipe),
        extra={"selection": stage.selection},
    )
    results: dict[str, Any] = {
        "selection": stage.selection,
        "steps": run.step,
        "world_size": run.world,
        "corrupt_samples": stage.counters["corrupt"],
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
