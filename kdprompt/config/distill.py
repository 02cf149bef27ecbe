"""``kdprompt distill`` recipes: a student learns from a teacher and its cache on unlabelled shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from kdprompt.config.base import StrictModel
from kdprompt.config.common import (
    CheckpointConfig,
    Resume,
    RunName,
    StreamConfig,
    WarmupCosineConfig,
)
from kdprompt.data.augment import AugmentationConfig
from kdprompt.data.sources import DataConfig
from kdprompt.models.student import StudentConfig
from kdprompt.objectives import ObjectivesConfig


class DistillTrainConfig(StreamConfig, WarmupCosineConfig):
    """Optimisation of the student (PromptKD's defaults)."""

    batch_size: int = Field(default=8, ge=1, description="per-process batch size")
    epochs: int = Field(default=20, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.005, gt=0)


class TeacherOutputsConfig(StrictModel):
    """The teacher-output cache (``kdprompt teacher-outputs``): the teacher's image features of V seeded
    augmented views of every unlabelled image, precomputed once and replayed by distillation."""

    path: Path = Field(description="where `kdprompt teacher-outputs` writes them (manifest.json + parts/)")
    # 4: on the demo (3 seeds) as good as online distillation (HM 57.33 vs 57.63; 10 views: 57.10), and the
    # precompute costs V teacher forwards per image, against 20 online: fewer views, cheaper recipe
    # (docs/TEACHER_CACHE.md).
    views: int = Field(default=4, ge=1, description="augmented views stored per image (V)")
    dtype: Literal["fp16", "bf16", "fp32"] = Field(
        default="fp16", description="storage dtype of the features"
    )
    seed: int = Field(default=0, description="seed of the views' crop boxes and flips")
    batch_size: int = Field(default=64, ge=1, description="views per teacher forward while precomputing")
    use: bool = Field(
        default=True,
        description="distill reads the stored features instead of running the teacher's image tower "
        "(false: online teacher; the section then only tells `kdprompt teacher-outputs` where to write)",
    )


class DistillRecipe(StrictModel):
    """``kdprompt distill``: train a student from unlabelled shards against a teacher and its cache."""

    recipe: Literal["distill"] = "distill"
    name: RunName = Field(description="run name: outputs go to <output_dir>/<name>/student/")
    description: str = ""
    seed: int = 1
    output_dir: Path = Path("runs")
    teacher: Path = Field(description="the teacher directory (runs/<name>/teacher)")
    cache: Path | None = Field(
        default=None, description="the teacher's text-feature cache (default cache/<teacher run>)"
    )
    student: StudentConfig
    data: DataConfig = Field(
        description="unlabelled images (labels, if any, are ignored); written to shards once"
    )
    split: Literal["train", "val", "test"] = "train"
    shards_dir: Path = Path("cache/shards")
    shard_maxcount: int = Field(default=1000, ge=1)
    objectives: ObjectivesConfig = Field(
        description="registered objective name -> its settings (weight, ...); the loss is their weighted sum"
    )
    augmentation: AugmentationConfig = Field(
        default_factory=AugmentationConfig,
        description="training-image augmentation (preset + overrides); the teacher sees the same augmented view",
    )
    train: DistillTrainConfig = DistillTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Resume | Path = "auto"
    selection: Literal["last", "val"] = Field(
        default="last",
        description=(
            "last: the student of the final epoch; val: the epoch best on the teacher's few-shot val split "
            "(the base classes it trained on; never test; PromptKD itself selects on the base test split)"
        ),
    )
    evaluate: bool = Field(
        default=True, description="report base/novel/HM on the teacher's test split at the end"
    )
    teacher_outputs: TeacherOutputsConfig | None = Field(
        default=None,
        description="precomputed teacher image features of seeded views (see docs/TEACHER_CACHE.md); "
        "null: the teacher encodes every batch",
    )

    @model_serializer(mode="wrap")
    def _omit_unset_teacher_outputs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Unset, the section is left out of dumps: recipes without it keep their fingerprints (and
        # so their checkpoints) from before it existed.
        data = handler(self)
        if data.get("teacher_outputs") is None:
            data.pop("teacher_outputs", None)
        return data
