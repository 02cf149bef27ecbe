"""Recipe sections every training command shares: the loop, checkpoints, zero-shot evaluations."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdprompt.config.base import StrictModel
from kdprompt.data.sources import DataConfig


class LoopConfig(StrictModel):
    """Loop settings every training command shares."""

    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    stop_after_steps: int | None = Field(
        default=None,
        ge=1,
        description="end this invocation after N more steps (checkpointed), e.g. to fit a job slot; rerun to continue",
    )
    num_workers: int = Field(default=0, ge=0, description="data-loading worker processes per rank")
    log_every: int = Field(default=10, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on a GPU that supports it, no on CPU"
    )


class StreamConfig(LoopConfig):
    """A loop that streams webdataset shards (pretrain, distill)."""

    shuffle_buffer: int = Field(default=1000, ge=0)
    resampled: bool = Field(default=False, description="sample shards with replacement (infinite stream)")


class CheckpointConfig(StrictModel):
    """When to write checkpoints and how many to keep."""

    every_steps: int | None = Field(default=None, ge=1, description="also checkpoint every N steps")
    keep_last: int = Field(default=2, ge=1)


class ZeroShotEval(StrictModel):
    """A labelled split on which to report zero-shot top-1 accuracy."""

    name: str
    data: DataConfig
    split: Literal["train", "val", "test"] = "test"
    templates: Literal["simple", "ensemble"] = Field(
        default="simple", description='simple: "a photo of a {}."; ensemble: open_clip\'s ImageNet templates'
    )
    classes: Literal["all", "base", "novel"] = "all"


Resume = Literal["auto", "never"]
