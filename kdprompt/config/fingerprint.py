"""Recipe fingerprints: a digest of what determines a run's result, so resume can refuse another recipe."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

# Fields that do not change what a run computes: where it writes, how it logs, how it is scheduled.
_NON_SEMANTIC = {
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
    "stop_after_steps",
    "log_every",
    "num_workers",
}


def _semantic(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _semantic(v) for k, v in node.items() if k not in _NON_SEMANTIC}
    if isinstance(node, list):
        return [_semantic(v) for v in node]
    return node


def recipe_fingerprint(recipe: BaseModel) -> str:
    """A digest of what determines a run's result (model, data, method, optimisation, seed).

    A data source contributes its own identity (``DataSource.identity``): the synthetic world, for one,
    gives its generator version and style instead of where it is stored, so a changed generator never
    passes for the same data.
    """
    data = _semantic(recipe.model_dump(mode="json"))
    source = getattr(recipe, "data", None)
    if hasattr(source, "identity"):
        data["data"] = _semantic(source.identity())
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
