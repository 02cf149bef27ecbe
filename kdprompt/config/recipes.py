"""Which schema validates which kind of recipe (the ``recipe:`` field of a YAML file)."""

from __future__ import annotations

from kdprompt.config.base import StrictModel
from kdprompt.config.clipkd import ClipKDRecipe
from kdprompt.config.distill import DistillRecipe
from kdprompt.config.pretrain import PretrainRecipe
from kdprompt.config.teacher import TeacherRecipe
from kdprompt.data.sources import DataConfig

RECIPE_MODELS: dict[str, type[StrictModel]] = {
    "pretrain": PretrainRecipe,
    "teacher": TeacherRecipe,
    "distill": DistillRecipe,
    "clipkd": ClipKDRecipe,
}


class DataSection(StrictModel):
    """Just a ``data:`` section (``kdprompt shards`` and ``kdprompt eval --data`` validate theirs with it)."""

    data: DataConfig
