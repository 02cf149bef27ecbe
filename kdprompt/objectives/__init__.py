"""Distillation objectives, one file each, registered with their recipe config.

Two registries, because the two kinds of distillation see different batches:

- :data:`OBJECTIVES` (``kdprompt distill``, image only, cached class text features): ``kl``, ``fd``,
  ``icl_image``, ``crd_image``, registered in that order by importing this package;
- :data:`CLIPKD_OBJECTIVES` (``kdprompt clipkd``, image-text pairs, both towers train): CLIP-KD's
  ``task``, ``fd``, ``icl``, ``crd`` (:mod:`kdprompt.objectives.clipkd`).
"""

# Registration order is the order messages list them in: keep it, whatever a sorter says.
# isort: off
from kdprompt.objectives import kl  # noqa: F401  (each registers itself)
from kdprompt.objectives import fd  # noqa: F401
from kdprompt.objectives import icl_image  # noqa: F401
from kdprompt.objectives import crd_image  # noqa: F401
from kdprompt.objectives import clipkd  # noqa: F401

# isort: on
from kdprompt.objectives.base import OBJECTIVES, DistillBatch, Objective, ObjectiveConfig
from kdprompt.objectives.caption import CLIPKD_OBJECTIVES, CaptionBatch, CaptionObjective
from kdprompt.objectives.clipkd_combined import ClipKDObjectives, ClipKDObjectivesConfig
from kdprompt.objectives.combined import DistillObjectives, ObjectivesConfig, validate_objectives

__all__ = [
    "CLIPKD_OBJECTIVES",
    "OBJECTIVES",
    "CaptionBatch",
    "CaptionObjective",
    "ClipKDObjectives",
    "ClipKDObjectivesConfig",
    "DistillBatch",
    "DistillObjectives",
    "Objective",
    "ObjectiveConfig",
    "ObjectivesConfig",
    "validate_objectives",
]
