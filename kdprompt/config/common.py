"""Recipe sections every training command shares: the loop, checkpoints, zero-shot evaluations."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from kdprompt.config.base import StrictModel
from kdprompt.data.sources import DataConfig
from kdprompt.errors import KdpromptError
from kdprompt.models.templates import TemplateSetName, template_set

TEMPLATES_HELP = (
    "simple: \"a photo of a {}.\"; ensemble: open_clip's 80 ImageNet templates; promptsrc: PromptSRC's 60 "
    "(raw features averaged); coop: CoOp's per-dataset template (trainers/zsclip.py CUSTOM_TEMPLATES, coop data only)"
)


def check_templates_fit(name: str, info: ValidationInfo) -> str:
    """Field validator body: the template set ``name`` must work with the model's ``data`` (``coop`` needs coop data)."""
    data: Any = info.data.get("data")
    if data is not None:  # data that failed its own validation is reported on its own
        try:
            template_set(name, data)
        except KdpromptError as exc:
            raise ValueError(str(exc)) from None
    return name


def _single_path_component(name: str) -> str:
    # The name becomes <output_dir>/<name>/...: "../x", "/abs" or "" would write outside output_dir.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(
            f"the run name must be one folder name (no '/', not '.' or '..', not empty), got {name!r}; "
            "choose where runs go with output_dir"
        )
    return name


RunName = Annotated[str, AfterValidator(_single_path_component)]
"""A run name: one path component under ``output_dir``."""


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
    # Throughput settings (applied by kdprompt.train.runtime.apply_throughput_settings): they change how
    # fast a step runs, not what it computes, so they are left out of the recipe fingerprint.
    pin_memory: Literal["auto"] | bool = Field(
        default="auto",
        description="page-locked loader batches, so host-to-GPU copies overlap compute; auto: on with CUDA; "
        "no effect on CPU (there, num_workers is what speeds up decoding)",
    )
    allow_tf32: bool = Field(
        default=True,
        description="TF32 tensor cores for fp32 matmuls and convolutions (Ampere or newer GPUs); no effect on CPU",
    )
    channels_last: bool = Field(
        default=False,
        description="channels-last memory format for the trained model (CUDA; helps convolutional towers, "
        "little for ViTs; rarely worth it on CPU)",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the trained model (CUDA: faster steps after a compile of a minute or more; "
        "on CPU the compile time rarely pays off)",
    )


class StreamConfig(LoopConfig):
    """A loop that streams webdataset shards (pretrain, distill)."""

    shuffle_buffer: int = Field(default=1000, ge=0)
    shard_interleave: int = Field(
        default=16,
        ge=1,
        description="shards each data worker reads at once, round-robin, before the shuffle buffer (mixes classes)",
    )
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
    templates: TemplateSetName = Field(default="simple", description=TEMPLATES_HELP)
    classes: Literal["all", "base", "novel"] = "all"

    _templates_fit = field_validator("templates")(check_templates_fit)


Resume = Literal["auto", "never"]

LrSchedule = Literal["cosine_per_step", "dassl"]
LR_SCHEDULE_HELP = (
    "cosine_per_step: constant warm-up, then cosine to 0 updated every step; dassl: the CoOp-family "
    "references' (Dassl): constant warm-up epochs, then CosineAnnealingLR(T_max=epochs) stepped once per "
    "epoch, so each epoch has one lr and the last is above 0"
)


class WarmupCosineConfig(LoopConfig):
    """SGD settings and the warm-up + cosine schedule the teacher and distill loops share (PromptKD's)."""

    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_epochs: int = Field(default=1, ge=0, description="epochs at the constant warm-up lr")
    warmup_lr: float = Field(default=1e-5, gt=0)
    lr_schedule: LrSchedule = Field(default="cosine_per_step", description=LR_SCHEDULE_HELP)
