"""``kdprompt distill``: a student learns from a frozen teacher on unlabelled webdataset shards.

Per batch the teacher encodes the images once (no gradients, never DDP-wrapped), the class text
features come from the teacher's cache (never re-encoded), and the student + projector train on the
weighted objectives. Labels in the shards, if any, are ignored.

With ``teacher_outputs.use`` the teacher is never built: each image is cut to one of its stored views
(picked per epoch) and the step reads that view's precomputed teacher features
(:mod:`kdprompt.teacher_outputs`); the teacher loads only for the final evaluation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdprompt.config.distill import DistillRecipe
from kdprompt.config.fingerprint import recipe_fingerprint
from kdprompt.errors import KdpromptError
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


def freeze_teacher(teacher: Any, cfg: Any, device: torch.device) -> dict[str, bool]:
    """Freeze a teacher on ``device`` (eval, no gradients) with the train config's throughput settings.

    The settings apply to the teacher's image tower, which runs on every batch (or every stored view),
    as :func:`~kdprompt.train.runtime.apply_throughput_settings` applies them to the student; the
    teacher stays a plain module (never prepared, so never DDP-wrapped: it has nothing to synchronise).

    Returns:
        The settings in effect (see :func:`~kdprompt.train.runtime.apply_throughput_settings`).
    """
    from kdprompt.train.runtime import apply_throughput_settings

    teacher.requires_grad_(False)
    teacher.eval().to(device)
    return apply_throughput_settings(teacher.vision_tower, cfg, device)


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
        recipe: the distill recipe; with ``teacher_outputs.use`` the teacher's image features come from
            its precomputed outputs and ``teacher`` is only its identity
            (:class:`~kdprompt.teacher_outputs.teacher_ref.TeacherRecord`).
        recompute_text: re-encode the teacher's class texts through its prompted text tower at every step
            instead of reading them from the cache (what the PromptKD reference does; ``kdprompt bench
            distill`` times both). Not with stored teacher outputs: the teacher is not built then.
    """

    name = "distill"

    def __init__(self, recipe: DistillRecipe, recompute_text: bool = False) -> None:
        super().__init__(recipe)
        self.recompute_text = recompute_text
        # selection: val validates at every epoch end, which the scaffold only calls with epoch checkpoints.
        self.epoch_checkpoints = recipe.selection == "val"  # type: ignore[misc]
        self.best = BestOnVal()
        self.outputs: Any = None  # the TeacherOutputs read instead of running the teacher, if any

    @property
    def cached(self) -> bool:
        """Whether the teacher's image features come from stored teacher outputs."""
        return self.recipe.teacher_outputs is not None and self.recipe.teacher_outputs.use

    def run_dir(self) -> Path:
        return run_dir_of(self.recipe)

    def setup(self, run: Run) -> None:
        from kdprompt.data.augment import train_transform, view_converter
        from kdprompt.models.loading import create_clip
        from kdprompt.models.student import Student
        from kdprompt.models.teacher import load_teacher
        from kdprompt.objectives import DistillObjectives
        from kdprompt.text_features import load_cache

        recipe, cfg = self.recipe, self.recipe.train
        if self.cached:
            from kdprompt.teacher_outputs.teacher_ref import read_teacher_record

            if self.recompute_text:
                raise KdpromptError(
                    "recompute_text encodes class texts with the teacher, which distilling from stored "
                    "teacher outputs does not build; set teacher_outputs.use=false to time it"
                )
            self.teacher = read_teacher_record(recipe.teacher)
        else:
            self.teacher = load_teacher(recipe.teacher)
            freeze_teacher(self.teacher, cfg, run.device)
        self.cache = load_cache(
            cache_of(recipe), expect_fingerprint=self.teacher.fingerprint, load_index=False
        )
        self.val = teacher_val_split(self.teacher) if recipe.selection == "val" else None
        self.text = self.cache.features.to(run.device)
        self.logit_scale = torch.tensor(self.cache.logit_scale, device=run.device)
        student = Student(create_clip(recipe.student.model), recipe.student, out_dim=self.cache.embed_dim)
        self.model = DistillModule(student, DistillObjectives(recipe.objectives))
        # The student's augmented batch, converted, is the teacher's input: both see the same view
        # (as in PromptKD's trainers/promptkd.py, where one batch feeds both models).
        self.augment = train_transform(recipe.augmentation, student.visual.preprocess_cfg)
        if not self.cached:
            teacher_view = train_transform(recipe.augmentation, self.teacher.clip_model.visual.preprocess_cfg)
            self.to_teacher = view_converter(self.augment, teacher_view)
        self.plan(run)
        if self.cached:
            self._open_outputs(student.visual.preprocess_cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _open_outputs(self, student_preprocess: Any) -> None:
        """Open the recipe's teacher outputs (refused unless made for this teacher, shards and views)."""
        from kdprompt.data.augment import ReplayableView
        from kdprompt.teacher_outputs.manifest import recipe_spec
        from kdprompt.teacher_outputs.reader import open_teacher_outputs
        from kdprompt.teacher_outputs.replay import ReplayTransform

        recipe = self.recipe
        spec = recipe_spec(recipe, self.teacher.fingerprint, self.urls, student_preprocess)
        self.outputs = open_teacher_outputs(recipe.teacher_outputs.path, spec)
        if self.outputs.embed_dim != self.cache.embed_dim:
            raise KdpromptError(
                f"teacher outputs at {recipe.teacher_outputs.path} hold {self.outputs.embed_dim}-d features, "
                f"the text cache {cache_of(recipe)} {self.cache.embed_dim}-d; they are of different teachers"
            )
        view = ReplayableView(recipe.augmentation, student_preprocess)
        self.augment = ReplayTransform(self.outputs, view, recipe.seed)

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

    def teacher_features(self, run: Run, batch: dict, images: Tensor) -> Tensor:
        """The teacher's image features (B, D, fp32) of the batch's views: stored, or encoded now.

        Stored: the batch's images are the views of the epoch ``run.step // run.per_epoch`` picked (see
        :class:`~kdprompt.teacher_outputs.replay.ReplayTransform`), so the step must be the batch's own.
        """
        if self.outputs is not None:
            from kdprompt.teacher_outputs.replay import stored_features

            epoch = run.step // run.per_epoch
            stored = stored_features(self.outputs, self.recipe.seed, epoch, batch["url"], batch["key"])
            return stored.to(run.device, non_blocking=True).float()
        with torch.no_grad():
            return self.teacher.encode_images(self.to_teacher(images)).float()

    def step(self, run: Run, batch: dict) -> dict[str, Tensor]:
        """Teacher image features (no gradients; stored or encoded), class text features (cached), one
        student update."""
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
            t = self.teacher_features(run, batch, images)
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
    device = next(student.parameters()).device
    if stage.cached:
        tower_parameters = stage.outputs.manifest["teacher_image_tower_parameters"]
    else:
        tower_parameters = sum(p.numel() for p in teacher.clip_model.visual.parameters())
    results: dict[str, Any] = {
        "selection": stage.selection,
        "steps": run.step,
        "world_size": run.world,
        "corrupt_samples": stage.counters["corrupt"],
        "image_tower_parameters": student.image_tower_parameters(),
        "teacher_image_tower_parameters": tower_parameters,
    }
    if stage.cached:
        results["teacher_outputs"] = {"path": str(recipe.teacher_outputs.path), "views": stage.outputs.views}
    if recipe.evaluate and teacher.data_config is not None:
        from kdprompt.data.sources import load_split
        from kdprompt.evaluate import evaluate_base_novel, evaluation_table
        from kdprompt.models.student import StudentClassifier

        if stage.cached:  # the teacher's row: built now, after training, never on the hot path
            from kdprompt.models.teacher import load_teacher

            teacher = load_teacher(recipe.teacher, device=device)
        test = load_split(teacher.data_config, "test")
        rows = [
            evaluate_base_novel(teacher, test, device=device),
            evaluate_base_novel(StudentClassifier(student, cache), test, device=device),
        ]
        results["eval"] = rows
        table = evaluation_table(rows)
        write_text_atomic(run_dir / "eval.md", table + "\n")
        tqdm.write("\n" + table)
    write_json_atomic(run_dir / "metrics.json", results)
    names = ["loss", *recipe.objectives, "lr"]
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", names, title=f"distill {recipe.name}")
