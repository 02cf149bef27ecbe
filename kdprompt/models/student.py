"""The student: an open_clip image tower adapted by prompts, fully, or not at all, plus a projector.

Its features live in the teacher's embedding space (``normalize(projector(tower(x)))``), so it
classifies with the teacher's cached class text features alone: no text tower at inference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdprompt.config.base import StrictModel
from kdprompt.errors import KdpromptError
from kdprompt.io import atomic_write, write_json_atomic
from kdprompt.models.loading import LoadedClip, create_clip
from kdprompt.models.prompt_methods.base import PROMPT_INIT_STD, check_depth
from kdprompt.models.spec import ModelSpec
from kdprompt.models.teacher import model_identity
from kdprompt.models.towers import AppendPrompts, PromptedVisionTower
from kdprompt.registry import Registry
from kdprompt.text_features import load_cache
from kdprompt.version import __version__

PROJECTORS: Registry[type[nn.Module]] = Registry("projector")


@PROJECTORS.register("mlp")
class MLPProjector(nn.Sequential):
    """PromptKD's projector: Linear(d, D) - BatchNorm - ReLU - Linear(D, D)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, out_dim),
            nn.BatchNorm1d(out_dim),
            nn.ReLU(inplace=True),
            nn.Linear(out_dim, out_dim),
        )


@PROJECTORS.register("linear")
class LinearProjector(nn.Linear):
    """A single linear map d -> D (CLIP-KD's choice when the widths differ)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)


class Adaptation:
    """How a student's image tower adapts to the teacher. One class per kind, registered by name.

    ``attach`` adds what the adaptation trains to the student (its modules are the student's, so their
    state-dict keys are part of ``student.safetensors``); ``tower_features`` runs the tower.
    """

    trains_tower: ClassVar[bool] = False
    """Whether every weight of the image tower trains (else it is frozen and kept in eval mode)."""

    def attach(self, student: Student, cfg: StudentConfig) -> None:
        """Add the adaptation's trainable parts to ``student`` (its tower is already frozen unless
        ``trains_tower``); default none."""

    def tower_features(self, student: Student, images: Tensor) -> Tensor:
        """The adapted tower's output, before the projector."""
        return student.visual(images)


ADAPTATIONS: Registry[type[Adaptation]] = Registry("student adaptation")


@ADAPTATIONS.register("prompts")
class PromptAdaptation(Adaptation):
    """PromptKD: the tower is frozen; deep visual prompts (``n_ctx`` tokens at ``depth`` blocks) train."""

    def attach(self, student: Student, cfg: StudentConfig) -> None:
        """A block-by-block tower and one prompt per depth."""
        student.tower = PromptedVisionTower(student.visual, student.spec.name)
        check_depth(cfg.depth, student.tower.num_layers, "student.depth")
        student.prompts = nn.ParameterList(
            nn.Parameter(torch.randn(cfg.n_ctx, student.tower.width) * PROMPT_INIT_STD)
            for _ in range(cfg.depth)
        )

    def tower_features(self, student: Student, images: Tensor) -> Tensor:
        """The tower with the prompts appended after the patch tokens and replaced at each depth."""
        return student.tower(images, AppendPrompts(list(student.prompts)))


@ADAPTATIONS.register("full")
class FullAdaptation(Adaptation):
    """Every weight of the image tower trains (the compact-student case)."""

    trains_tower = True


@ADAPTATIONS.register("projector")
class ProjectorOnly(Adaptation):
    """Only the projector trains; the tower is frozen."""


class StudentConfig(StrictModel):
    """The student: an open_clip image tower, how it adapts, and its projector."""

    model: ModelSpec
    adaptation: str = Field(
        default="prompts",
        description="prompts: frozen tower + deep visual prompts (PromptKD); full: every tower weight trains; "
        "projector: only the projector (any registered student adaptation)",
    )
    n_ctx: int = Field(default=4, ge=1, description="visual prompt tokens per depth (adaptation: prompts)")
    depth: int = Field(default=9, ge=1, description="blocks receiving visual prompts (adaptation: prompts)")
    projector: Literal["mlp", "linear"] = Field(
        default="mlp", description="mlp: Linear-BatchNorm-ReLU-Linear (PromptKD); linear"
    )

    @field_validator("adaptation")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in ADAPTATIONS:
            raise ValueError(ADAPTATIONS.unknown_message(value))
        return value


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


class Student(nn.Module):
    """Image tower + projector to the teacher's embedding dim.

    Args:
        clip: the student's open_clip model; only its image tower is kept.
        cfg: ``adaptation`` (prompts | full | projector), ``projector`` (mlp | linear), ``n_ctx``, ``depth``.
        out_dim: the teacher's embedding dim.
    """

    def __init__(self, clip: LoadedClip, cfg: Any, out_dim: int) -> None:
        super().__init__()
        self.adaptation = cfg.adaptation
        self.visual = clip.model.visual
        self.transform = clip.preprocess_val
        self.train_transform = clip.preprocess_train
        self.spec = clip.spec
        in_dim = _output_dim(clip.model)
        self.prompts: nn.ParameterList | None = None
        self.adapter = ADAPTATIONS.get(cfg.adaptation)()
        # Freeze (or not) first: an adaptation may then add parameters or unfreeze parts of the tower.
        self.visual.requires_grad_(self.adapter.trains_tower)
        self.adapter.attach(self, cfg)
        self.projector = PROJECTORS.get(cfg.projector)(in_dim, out_dim)
        self.name = f"student {clip.spec.name} ({cfg.adaptation})"

    def train(self, mode: bool = True) -> Student:
        """Frozen towers stay in eval mode."""
        super().train(mode)
        if not self.adapter.trains_tower:
            self.visual.eval()
        return self

    def tower_features(self, images: Tensor) -> Tensor:
        """The adapted image tower's output, before the projector."""
        return self.adapter.tower_features(self, images)

    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised features in the teacher's embedding space (B x D)."""
        return F.normalize(self.projector(self.tower_features(images)), dim=-1)

    encode_images = forward

    def trainable_state(self) -> dict[str, Tensor]:
        """What training changes: trainable parameters and the projector's BatchNorm statistics."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names or k.startswith("projector.")}

    def image_tower_parameters(self) -> int:
        """Parameters of the image tower (prompts and projector excluded)."""
        return count_parameters(self.visual)


def _output_dim(model: nn.Module) -> int:
    """The image tower's feature width: its ``output_dim``, else the CLIP's joint embedding width."""
    dim = getattr(model.visual, "output_dim", None)
    if dim is None:
        dim = model.text_projection.shape[-1]
    return int(dim)


STUDENT_FILE, STUDENT_WEIGHTS = "student.json", "student.safetensors"


class StudentClassifier:
    """A student classifying with cached class text features (the evaluation interface)."""

    def __init__(self, student: Student, cache: Any, name: str | None = None) -> None:
        self.student = student
        self.cache = cache
        self.name = name or student.name
        self.transform = student.transform

    def encode_images(self, images: Tensor) -> Tensor:
        """Normalised student features in the teacher's space."""
        return self.student(images)

    def class_features(self, classnames: list[str]) -> Tensor:
        """Cached teacher text features of ``classnames`` (no text encoder)."""
        device = next(self.student.parameters()).device
        return self.cache.subset(classnames).features.to(device)

    def to(self, device: Any) -> StudentClassifier:
        self.student.to(device)
        return self


def save_student(
    run_dir: Any,
    student: Student,
    *,
    recipe: Any,
    teacher: Any,
    cache: Any,
    cache_path: Any,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``student.safetensors`` (the whole student) then ``student.json`` (plus ``extra``) atomically."""

    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    atomic_write(
        run_dir / STUDENT_WEIGHTS, lambda p: save_file(state, str(p), metadata={"kdprompt": __version__})
    )
    write_json_atomic(
        run_dir / STUDENT_FILE,
        {
            "format_version": 1,
            "kdprompt_version": __version__,
            "student": {
                **recipe.student.model_dump(mode="json"),
                "model": model_identity(recipe.student.model),
            },
            "embed_dim": cache.embed_dim,
            "teacher": {"path": str(recipe.teacher), "fingerprint": teacher.fingerprint},
            "cache": {
                "path": str(cache_path),
                "teacher_fingerprint": cache.teacher_fingerprint,
                "classnames_sha256": cache.manifest["classnames_sha256"],
                "num_classes": cache.num_classes,
            },
            "image_tower_parameters": student.image_tower_parameters(),
            "objectives": {name: cfg.model_dump(mode="json") for name, cfg in recipe.objectives.items()},
            **(extra or {}),
        },
    )


def load_student(
    path: Any, device: str | torch.device = "cpu", cache_path: Any = None
) -> tuple[Student, Any]:
    """Rebuild a student from ``runs/<name>/student`` and load its text-feature cache.

    Args:
        path: the student directory.
        device: where the student lives.
        cache_path: another cache of the same teacher (e.g. another class list) instead of the one the
            student trained with.

    Raises:
        KdpromptError: not a student directory, or a cache that is missing, damaged or of another teacher.
    """

    path = Path(path)
    meta_file = path / STUDENT_FILE
    if not meta_file.is_file() or not (path / STUDENT_WEIGHTS).is_file():
        raise KdpromptError(
            f"{path} is not a student directory (student.json / student.safetensors missing); "
            "train one with `kdprompt distill RECIPE`"
        )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    spec_fields = meta["student"]["model"]
    cfg = StudentConfig(
        **{
            **{k: v for k, v in meta["student"].items() if k != "model"},
            "model": ModelSpec(**{k: spec_fields[k] for k in ("name", "pretrained", "precision")}),
        }
    )
    # The student maps images into its teacher's space: only that teacher's text features fit.
    cache = load_cache(
        Path(cache_path if cache_path is not None else meta["cache"]["path"]),
        expect_fingerprint=meta["cache"]["teacher_fingerprint"],
    )
    # student.safetensors holds the whole image tower: the base weights need not be read (or downloaded).
    clip = create_clip(cfg.model, device=device, load_weights=False)
    student = Student(clip, cfg, out_dim=int(meta["embed_dim"]))
    student.load_state_dict(load_file(str(path / STUDENT_WEIGHTS)))
    return student.to(device).eval(), cache
