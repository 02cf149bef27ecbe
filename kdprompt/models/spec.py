"""Recipe model of a CLIP model: which architecture, which weights, which precision."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdprompt.config.base import StrictModel


class ModelSpec(StrictModel):
    """An open_clip model: architecture ``name``, optional ``pretrained`` weights, ``precision``."""

    name: str = Field(
        description=(
            "an open_clip built-in config (e.g. ViT-B-32), a kdprompt config (e.g. kd-tiny-teacher), "
            "or a path to an open_clip JSON model config"
        )
    )
    pretrained: str | None = Field(
        default=None,
        description=(
            "an open_clip pretrained tag (needs the internet on first use), a local weights file "
            "(.safetensors/.pt/.pth/.bin), or none for random initialisation"
        ),
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
