"""The cache's FAISS index: an exact inner-product index over the (unit-length) class features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from kdprompt.errors import KdpromptError
from kdprompt.text_features.manifest import INDEX_FILE, rebuild_hint


def flat_index(features: torch.Tensor) -> Any:
    """A ``faiss.IndexFlatIP`` holding the rows of ``features`` as float32."""
    vectors = np.ascontiguousarray(features.detach().float().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def read_index(path: Path, features: torch.Tensor, manifest: dict[str, Any]) -> Any:
    """Read ``index.faiss`` of the cache directory ``path`` and check it holds ``features``.

    Raises:
        KdpromptError: the file is missing or unreadable, or the index is stale (other size or vectors).
    """
    file = path / INDEX_FILE
    hint = rebuild_hint(path, manifest)
    if not file.is_file():
        raise KdpromptError(f"text-feature cache {path} is incomplete: {INDEX_FILE} is missing; {hint}")
    try:
        index = faiss.read_index(str(file))
    except (RuntimeError, MemoryError) as err:  # a garbage header can announce any size
        raise KdpromptError(f"{file} is not a readable FAISS index; {hint}") from err
    num_classes, dim = features.shape
    if index.ntotal != num_classes or index.d != dim:
        raise KdpromptError(
            f"{file} holds {index.ntotal} vectors of dimension {index.d} but the cache has {num_classes} "
            f"classes x {dim} dims: the index is stale; {hint}"
        )
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        # A flat index stores the vectors themselves: check they are this cache's features.
        vectors = index.reconstruct_n(0, index.ntotal)
        if not np.allclose(vectors, features.numpy(), rtol=0, atol=1e-6):
            raise KdpromptError(f"{file} does not hold this cache's features: the index is stale; {hint}")
    return index
