"""Distillation objectives (stage two), one file each, registered with their recipe config.

Importing the package registers the built-ins in this order: kl, fd, icl, crd.
"""

# Registration order is the order messages list them in: keep it, whatever a sorter says.
# isort: off
from kdprompt.objectives import kl  # noqa: F401  (each registers itself)
from kdprompt.objectives import fd  # noqa: F401
from kdprompt.objectives import icl  # noqa: F401
from kdprompt.objectives import crd  # noqa: F401

# isort: on
from kdprompt.objectives.base import OBJECTIVES, DistillBatch, Objective, ObjectiveConfig
from kdprompt.objectives.combined import DistillObjectives, ObjectivesConfig, validate_objectives

__all__ = [
    "OBJECTIVES",
    "DistillBatch",
    "DistillObjectives",
    "Objective",
    "ObjectiveConfig",
    "ObjectivesConfig",
    "validate_objectives",
]
