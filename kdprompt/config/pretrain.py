"""``kdprompt pretrain`` recipes: contrastive CLIP training on image-text data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from kdprompt.config.base import StrictModel
from kdprompt.config.common import CheckpointConfig, Resume, RunName, StreamConfig, ZeroShotEval
from kdprompt.data.sources import DataConfig
from kdprompt.models.spec import ModelSpec


class TrainConfig(StreamConfig):
    """Optimisation of contrastive pre-training (AdamW, warm-up then cosine)."""

    batch_size: int = Field(default=128, ge=1, description="per-process batch size")
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)


class PretrainRecipe(StrictModel):
    """``kdprompt pretrain``: contrastive CLIP training on image-text data."""

    recipe: Literal["pretrain"] = "pretrain"
    name: RunName = Field(description="run name: outputs go to <output_dir>/<name>/pretrain/")
    description: str = ""
    seed: int = 0
    output_dir: Path = Path("runs")
    model: ModelSpec
    data: DataConfig = Field(description="image-text data; non-shard sources are written to shards once")
    split: Literal["train", "val", "test"] = "train"
    shards_dir: Path = Field(
        default=Path("cache/shards"), description="where non-shard sources are materialised as shards"
    )
    shard_maxcount: int = Field(default=1000, ge=1, description="samples per shard when materialising shards")
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Resume | Path = Field(
        default="auto", description="auto: continue from the latest complete checkpoint of this run"
    )
    eval: list[ZeroShotEval] = Field(default_factory=list, description="zero-shot evaluations at the end")
    export: Path | None = Field(
        default=None,
        description="also copy the final open_clip weights here (e.g. cache/pretrained/x.safetensors)",
    )
