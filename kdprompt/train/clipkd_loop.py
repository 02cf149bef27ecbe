"""``kdprompt clipkd``: CLIP-KD's caption mode, a student CLIP distilled from a frozen teacher CLIP.

Pre-training (:mod:`kdprompt.train.pretrain_loop`) plus a frozen teacher: both towers of the student
train on image-text shards with CLIP-KD's objectives (its own CLIP task loss, ``fd``, ``icl``, ``crd``),
the features of every rank gathered as open_clip's ``ClipLoss`` gathers them. The output is an
open_clip-loadable CLIP in the format ``kdprompt pretrain`` writes (``model.safetensors``, and a copy at
``export``), so ``kdprompt eval --zero-shot`` and a teacher recipe's ``model.pretrained`` take it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from open_clip.loss import gather_features
from torch import Tensor, nn

from kdprompt.config.clipkd import ClipKDRecipe
from kdprompt.data.augment import view_converter
from kdprompt.errors import KdpromptError
from kdprompt.models.loading import create_clip
from kdprompt.objectives.clipkd_combined import ClipKDObjectives
from kdprompt.train.checkpoint import Checkpoint
from kdprompt.train.pretrain_loop import MAX_LOGIT_SCALE, ClipStage
from kdprompt.train.run import Run, run_stage
from kdprompt.train.runtime import cosine_lr, decay_groups


def run_dir_of(recipe: ClipKDRecipe) -> Path:
    """``<output_dir>/<name>/clipkd``."""
    return Path(recipe.output_dir) / recipe.name / "clipkd"


def embed_dim(model: nn.Module) -> int:
    """The width of an open_clip model's joint embedding space."""
    text_projection = getattr(model, "text_projection", None)
    if isinstance(text_projection, Tensor):
        return int(text_projection.shape[-1])
    return int(model.visual.output_dim)


class ClipKDModule(nn.Module):
    """Student CLIP + objectives (projectors, ICL's scale) in one module, so DDP syncs them together.

    Args:
        student: the student open_clip model.
        objectives: the weighted objectives.
        rank, world: this process and how many there are.
        gather_with_grad: gather the student's features with gradients (see the recipe's
            ``train.gather_with_grad``).
    """

    def __init__(
        self, student: nn.Module, objectives: ClipKDObjectives, rank: int, world: int, gather_with_grad: bool
    ) -> None:
        super().__init__()
        self.student = student
        self.objectives = objectives
        self.rank, self.world, self.gather_with_grad = rank, world, gather_with_grad

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        teacher_image: Tensor,
        teacher_text: Tensor,
        teacher_scale: Tensor,
    ) -> dict[str, Tensor]:
        """The weighted terms on the global batch (this rank's pairs with every other rank's)."""
        image = self.student.encode_image(images)  # raw: CLIP-KD projects before normalising
        text = self.student.encode_text(tokens)
        scale = self.student.logit_scale.exp()
        if self.world > 1:
            image, text = gather_features(
                image, text, gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world
            )
            teacher_image, teacher_text = gather_features(
                teacher_image, teacher_text, rank=self.rank, world_size=self.world
            )
        return self.objectives(image, text, scale, teacher_image, teacher_text, teacher_scale)


class ClipKDStage(ClipStage):
    """A student CLIP trains on image-text shards against a frozen teacher CLIP (CLIP-KD)."""

    name = "clipkd"

    def run_dir(self) -> Path:
        return run_dir_of(self.recipe)

    def setup(self, run: Run) -> None:
        recipe, cfg = self.recipe, self.recipe.train
        # The student first, straight after set_seed, as CLIP-KD builds it before the teacher
        # (create_kd_model_and_transforms, src/open_clip/factory.py): it starts from the weights
        # `kdprompt pretrain` gives it at the same seed.
        self.clip = create_clip(recipe.student)
        student = self.clip.model
        # The teacher's throwaway random init and the projectors draw from a fork of the RNG, so the
        # augmentations after setup get the stream they get in `kdprompt pretrain` (CLIP-KD reseeds
        # after building both models: random_seed(args.seed, args.rank) in src/training/main_kd.py).
        with torch.random.fork_rng(devices=[]):
            self.teacher = create_clip(recipe.teacher)
            objectives = ClipKDObjectives(
                recipe.objectives, embed_dim(student), embed_dim(self.teacher.model)
            )
        self.teacher.model.requires_grad_(False)
        self.teacher.model.eval().to(run.device)
        if not objectives.uses_student_logits:
            student.logit_scale.requires_grad_(False)  # DDP refuses parameters that never get a gradient
        self.model = ClipKDModule(student, objectives, run.rank, run.world, cfg.gather_with_grad)
        self.to_teacher = self._teacher_view()
        self.plan(run)
        groups = decay_groups(student, cfg.weight_decay)
        extra = [p for p in objectives.parameters() if p.requires_grad]
        if extra:  # CLIP-KD: the loss's parameters are one more AdamW group (see objectives_weight_decay)
            groups.append({"params": extra, "weight_decay": cfg.objectives_weight_decay})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    def _teacher_view(self) -> Any:
        """The teacher sees the student's augmented batch, re-normalised (and resized) when they differ."""
        same = self.clip.model.visual.preprocess_cfg == self.teacher.model.visual.preprocess_cfg
        return (
            (lambda x: x)
            if same
            else view_converter(self.clip.preprocess_train, self.teacher.preprocess_train)
        )

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.weights)

    def start(self, run: Run) -> None:
        super().start(run)
        self.core: ClipKDModule = run.accelerator.unwrap_model(self.model)

    def transform(self) -> Any:
        return self.clip.preprocess_train

    @torch.no_grad()
    def _teacher_features(self, images: Tensor, texts: list[str], device: torch.device) -> tuple:
        teacher = self.teacher.model
        image = teacher.encode_image(self.to_teacher(images), normalize=True).float()
        text = teacher.encode_text(self.teacher.tokenizer(texts).to(device), normalize=True).float()
        return image, text, teacher.logit_scale.exp().float()

    def step(self, run: Run, batch: dict) -> dict[str, Tensor]:
        cfg = self.recipe.train
        texts = batch["text"]
        if not any(texts):
            raise KdpromptError(
                f"the shards of {self.urls[0]} ... have no captions (no txt member in a whole batch); "
                "kdprompt clipkd needs image-text pairs (img2dataset layout: <key>.jpg + <key>.txt)"
            )
        images = batch["image"].to(run.device, non_blocking=True)
        tokens = self.clip.tokenizer(texts).to(run.device)
        with run.accelerator.autocast():
            t_image, t_text, t_scale = self._teacher_features(images, texts, run.device)
            terms = self.model(images, tokens, t_image, t_text, t_scale)
        lr = cosine_lr(run.step, run.total_steps, cfg.lr, cfg.warmup_steps)
        # The student's gradients only, as CLIP-KD clips them (clip_grad_norm_(model.parameters()) in
        # train_kd_one_epoch, src/training/train.py): the projectors' and ICL's scale's gradients are
        # not clipped and do not count towards the student's norm.
        clip_grad = (self.core.student.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        run.optimizer_step(self.optimizer, terms["loss"], lr, clip_grad)
        with torch.no_grad():
            self.core.student.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.meter.record(batch)
        return terms

    def row(self, run: Run, epoch: int, terms: dict[str, Tensor]) -> dict[str, Any]:
        row: dict[str, Any] = {**run.mean(terms), "epoch": epoch, "lr": self.lr()}
        row["logit_scale"] = self.core.student.logit_scale.detach().exp().item()
        objectives = self.core.objectives.terms
        if "icl" in objectives:
            row["cross_logit_scale"] = objectives["icl"].scale.detach().item()
        return {**row, **self.meter.window(run.accelerator)}

    def finish(self, run: Run) -> None:
        """Export the student CLIP, evaluate it zero-shot and plot (main process); every rank's data record."""
        recipe = self.recipe
        details = {
            "student": recipe.student.model_dump(mode="json"),
            "teacher": recipe.teacher.model_dump(mode="json"),
        }
        curves = ["loss", *recipe.objectives, "logit_scale", "lr"]
        self.finish_clip(run, self.core.student, details, curves, terms=tuple(recipe.objectives))


def run_clipkd(recipe: ClipKDRecipe) -> Path:
    """Distil, checkpoint, export and evaluate; returns the run directory."""
    return run_stage(ClipKDStage(recipe))
