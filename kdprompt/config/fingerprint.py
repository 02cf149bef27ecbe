"""Recipe fingerprints: a digest of what determines a run's result, so resume can refuse another recipe."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

# Recipe fields that do not change what a run computes: where it writes, how it logs, how it is scheduled.
_NON_SEMANTIC_TOP = {
    "name",
    "description",
    "output_dir",
    "resume",
    "eval",
    "export",
    "evaluate",
    "cache_dir",
    "shards_dir",
    "checkpoint",
}
# ... and the same inside the ``train`` section. Only these two levels: a nested ``name`` (the model's,
# the prompt method's) is what the run computes with.
_NON_SEMANTIC_TRAIN = {
    "stop_after_steps",
    "log_every",
    "num_workers",
    # throughput settings: how fast a step runs (TF32 and compile change rounding only)
    "pin_memory",
    "allow_tf32",
    "channels_last",
    "compile",
}


def _semantic(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k not in _NON_SEMANTIC_TOP}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k not in _NON_SEMANTIC_TRAIN}
    return out


def recipe_fingerprint(recipe: BaseModel) -> str:
    """A digest of what determines a run's result (model, data, method, optimisation, seed).

    A data source contributes its own identity (``DataSource.identity``): the synthetic world, for one,
    gives its generator version and style instead of where it is stored, so a changed generator never
    passes for the same data.
    """
    data = _semantic(recipe.model_dump(mode="json"))
    source = getattr(recipe, "data", None)
    if hasattr(source, "identity"):
        data["data"] = source.identity()
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
