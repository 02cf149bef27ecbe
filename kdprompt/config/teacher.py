"""``kdprompt teacher`` recipes: prompt learning on few-shot labelled data, then the text-feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from kdprompt.config.base import StrictModel
from kdprompt.config.common import (
    TEMPLATES_HELP,
    CheckpointConfig,
    Resume,
    RunName,
    WarmupCosineConfig,
    check_templates_fit,
)
from kdprompt.data.augment import AugmentationConfig
from kdprompt.data.sources import DataConfig
from kdprompt.models.prompt_methods import MethodConfig, PromptSRCConfig
from kdprompt.models.spec import ModelSpec
from kdprompt.models.templates import TemplateSetName


class FewShotConfig(StrictModel):
    """The CoOp protocol: K labelled images per class of the chosen classes."""

    shots: int | None = Field(default=16, ge=1, description="images per class (None: all)")
    classes: Literal["base", "all"] = Field(
        default="base", description="train on the base half or all classes"
    )


class TeacherTrainConfig(WarmupCosineConfig):
    """Optimisation of the prompts (PromptSRC's base-to-novel defaults)."""

    batch_size: int = Field(default=4, ge=1, description="per-process batch size")
    epochs: int = Field(default=20, ge=1)
    lr: float = Field(default=0.0025, gt=0)


class TeacherRecipe(StrictModel):
    """``kdprompt teacher``: prompt learning on few-shot labelled data, then the text-feature cache."""

    recipe: Literal["teacher"] = "teacher"
    name: RunName = Field(description="run name: outputs go to <output_dir>/<name>/teacher/")
    description: str = ""
    seed: int = Field(default=1, description="drives few-shot sampling, data order and initialisation")
    output_dir: Path = Path("runs")
    model: ModelSpec
    data: DataConfig
    fewshot: FewShotConfig = FewShotConfig()
    method: MethodConfig = Field(
        default_factory=PromptSRCConfig, description="the prompt method (`name`) and its settings"
    )
    augmentation: AugmentationConfig = Field(
        default_factory=AugmentationConfig, description="training-image augmentation (preset + overrides)"
    )
    train: TeacherTrainConfig = TeacherTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Resume | Path = "auto"
    selection: Literal["last", "val"] = Field(
        default="last",
        description="last: the final (GPA-aggregated) prompts; val: the epoch best on the val split (never test)",
    )
    cache_dir: Path | None = Field(
        default=None, description="where the text-feature cache goes (default cache/<name>)"
    )
    evaluate: bool = Field(default=True, description="report base/novel/HM on the test split at the end")
    zero_shot_templates: TemplateSetName = Field(
        default="simple", description=f"prompts of the zero-shot CLIP row of that report; {TEMPLATES_HELP}"
    )

    _zero_shot_templates_fit = field_validator("zero_shot_templates")(check_templates_fit)
