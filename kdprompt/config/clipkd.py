"""``kdprompt clipkd`` recipes: CLIP-KD's caption mode, a whole student CLIP distilled on image-text data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from kdprompt.config.base import StrictModel
from kdprompt.config.common import CheckpointConfig, Resume, RunName, ZeroShotEval
from kdprompt.config.pretrain import TrainConfig
from kdprompt.data.sources import DataConfig
from kdprompt.models.spec import ModelSpec
from kdprompt.objectives.clipkd_combined import ClipKDObjectivesConfig, clipkd_defaults


class ClipKDTrainConfig(TrainConfig):
    """Optimisation of the student CLIP (AdamW, warm-up then cosine, as ``kdprompt pretrain``).

    ``grad_clip`` bounds the norm of the student's gradients only, as CLIP-KD does; the objectives'
    parameters are not clipped.
    """

    objectives_weight_decay: float = Field(
        default=0.01,
        ge=0,
        description=(
            "AdamW weight decay of the objectives' parameters (projectors, ICL's cross_logit_scale); CLIP-KD "
            "adds them as one optimizer group without a decay of its own, so AdamW's default 0.01 applies"
        ),
    )
    gather_with_grad: bool = Field(
        default=True,
        description=(
            "several processes: gather the features of every rank with gradients (torch.distributed.nn), "
            "so the update equals one process on the global batch; false: open_clip's plain all_gather, "
            "with only the local rank's features keeping gradients"
        ),
    )


class ClipKDRecipe(StrictModel):
    """``kdprompt clipkd``: a student CLIP (both towers) learns from a frozen teacher CLIP on image-text data."""

    recipe: Literal["clipkd"] = "clipkd"
    name: RunName = Field(description="run name: outputs go to <output_dir>/<name>/clipkd/")
    description: str = ""
    seed: int = 0
    output_dir: Path = Path("runs")
    teacher: ModelSpec = Field(
        description="the frozen teacher CLIP: an open_clip model with a tag or a weights file (e.g. a pretrain export)"
    )
    student: ModelSpec = Field(description="the student CLIP; both its towers train")
    data: DataConfig = Field(
        description="image-text data (captions from the shards' txt); non-shard sources are written to shards once"
    )
    split: Literal["train", "val", "test"] = "train"
    shards_dir: Path = Field(
        default=Path("cache/shards"), description="where non-shard sources are materialised as shards"
    )
    shard_maxcount: int = Field(default=1000, ge=1, description="samples per shard when materialising shards")
    objectives: ClipKDObjectivesConfig = Field(
        default_factory=clipkd_defaults,
        description="CLIP-KD objective name (task, fd, icl, crd) -> its settings; the loss is their weighted sum",
    )
    train: ClipKDTrainConfig = ClipKDTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Resume | Path = Field(
        default="auto", description="auto: continue from the latest complete checkpoint of this run"
    )
    eval: list[ZeroShotEval] = Field(
        default_factory=list, description="zero-shot evaluations of the student at the end"
    )
    export: Path | None = Field(
        default=None,
        description="also copy the student's final open_clip weights here (e.g. cache/pretrained/x.safetensors)",
    )
