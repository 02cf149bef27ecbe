"""Prompt methods for the teacher, one file each, registered with their recipe config and loss.

Importing the package registers the built-ins: promptsrc, maple.
"""

from kdprompt.config.base import registered
from kdprompt.models.prompt_methods import maple, promptsrc  # noqa: F401  (each registers itself)
from kdprompt.models.prompt_methods.base import (
    PROMPT_INIT_STD,
    PROMPT_METHODS,
    PromptAggregation,
    PromptLearner,
    PromptMethodConfig,
    TeacherOutputs,
    check_depth,
    phrase_context,
)
from kdprompt.models.prompt_methods.maple import CoupledPrompts, MaPLeConfig
from kdprompt.models.prompt_methods.promptsrc import GPAConfig, IndependentPrompts, PromptSRCConfig

MethodConfig = registered(lambda: PROMPT_METHODS, "name")
"""The ``method:`` recipe section: the config of the registered prompt method its ``name`` names."""

__all__ = [
    "PROMPT_INIT_STD",
    "PROMPT_METHODS",
    "CoupledPrompts",
    "GPAConfig",
    "IndependentPrompts",
    "MaPLeConfig",
    "MethodConfig",
    "PromptAggregation",
    "PromptLearner",
    "PromptMethodConfig",
    "PromptSRCConfig",
    "TeacherOutputs",
    "check_depth",
    "phrase_context",
]
