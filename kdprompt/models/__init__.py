"""open_clip models: specs, loading and saving, and prompt-ready towers."""

from kdprompt.models.loading import (
    LoadedClip,
    available_kdprompt_models,
    create_clip,
    resolve_model_name,
    save_clip_weights,
)
from kdprompt.models.spec import ModelSpec
from kdprompt.models.towers import (
    AppendPrompts,
    PromptedTextTower,
    PromptedVisionTower,
    PromptHook,
    ReplacePrompts,
)

__all__ = [
    "AppendPrompts",
    "LoadedClip",
    "ModelSpec",
    "PromptHook",
    "PromptedTextTower",
    "PromptedVisionTower",
    "ReplacePrompts",
    "available_kdprompt_models",
    "create_clip",
    "resolve_model_name",
    "save_clip_weights",
]
