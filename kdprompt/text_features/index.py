"""The cache's FAISS index over the (unit-length) class features: exact (flat) or IVF, as the manifest says.

What to build and how to search it is :mod:`kdprompt.text_features.ranking`'s job; this module builds a
cache's index as its manifest entry records, and refuses an ``index.faiss`` that is not the one the
manifest describes or does not hold the cache's features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from kdprompt.errors import KdpromptError
from kdprompt.text_features.manifest import FLAT_ENTRY, INDEX_FILE, index_entry, rebuild_hint
from kdprompt.text_features.ranking import IndexPlan, build_index, plan_index, tune_nprobe

# Rows compared at a time when checking an index's vectors: bounded memory for any vocabulary.
CHECK_ROWS = 65_536


def flat_index(features: torch.Tensor) -> Any:
    """A ``faiss.IndexFlatIP`` holding the rows of ``features`` as float32."""
    return build_index(features, IndexPlan("flat"))


# IVF scans its lists vector by vector, about 14x slower per vector than the exact search's matrix products
# (`kdprompt bench vocab`, 1M x 768: 14.3 s probing every list vs 1.06 s exact): it only wins when it
# probes well under a fourteenth of its lists.
MAX_PROBED_FRACTION = 1 / 16


def planned_index(features: torch.Tensor, kind: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The index ``kind`` (auto, flat, ivf) plans for ``features``, and its manifest entry.

    With ``auto``, an IVF index that would have to probe more than :data:`MAX_PROBED_FRACTION` of its
    lists to reach the recall target (it would be slower) is dropped for exact search (recorded as ``ivf_rejected``).
    An IVF index gets the smallest ``nprobe`` reaching :data:`~kdprompt.text_features.ranking.RECALL_TARGET`
    recall@1 against exact search; the entry records it with the measured recall.

    Raises:
        KdpromptError: an unknown kind.
    """
    plan = plan_index(int(features.shape[0]), kind)
    index = build_index(features, plan)
    if plan.kind == "flat":
        return index, dict(FLAT_ENTRY)
    figures = tune_nprobe(index, features)
    if kind == "auto" and figures["nprobe"] > MAX_PROBED_FRACTION * plan.nlist:
        # Reaching the recall target means scanning most lists: no faster than exact search (vectors
        # without cluster structure, e.g. random ones). `auto` keeps exact search and says why.
        rejected = {"nlist": plan.nlist, **figures}
        return build_index(features, plan_index(1, "flat")), {**FLAT_ENTRY, "ivf_rejected": rejected}
    return index, {"kind": "ivf", "nlist": plan.nlist, **figures}


def index_kind(index: Any) -> str:
    """``flat``, ``ivf``, or the FAISS class name of any other index."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    return type(index).__name__


def read_index(path: Path, features: torch.Tensor, manifest: dict[str, Any]) -> Any:
    """Read ``index.faiss`` of the cache directory ``path`` and check it is the manifest's, over ``features``.

    The index must be the kind the manifest's ``index`` entry names (flat when there is none), with its
    ``nlist`` for IVF, and hold exactly the cache's features; an IVF index gets the entry's ``nprobe``.

    Raises:
        KdpromptError: the file is missing or unreadable, another kind than the manifest says, or stale
            (other size or vectors).
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
    entry = index_entry(manifest)
    kind = index_kind(index)
    if kind != entry["kind"]:
        raise KdpromptError(
            f"{file} holds an index of kind {kind!r} but the cache manifest records kind "
            f"{entry['kind']!r}: the index does not belong to this cache; {hint}"
        )
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        if ivf.nlist != entry["nlist"]:
            raise KdpromptError(
                f"{file} has {ivf.nlist} inverted lists but the cache manifest says {entry['nlist']}: the "
                f"index does not belong to this cache; {hint}"
            )
        ivf.make_direct_map()  # lets the vectors be read back by id for the check below
        ivf.nprobe = entry["nprobe"]
    if not _holds(index, features):
        raise KdpromptError(f"{file} does not hold this cache's features: the index is stale; {hint}")
    return index


def _holds(index: Any, features: torch.Tensor) -> bool:
    """Whether row ``i`` of the index is row ``i`` of ``features`` for every ``i`` (flat and IVF store them)."""
    vectors = features.numpy()
    for start in range(0, len(vectors), CHECK_ROWS):
        count = min(CHECK_ROWS, len(vectors) - start)
        if not np.allclose(
            index.reconstruct_n(start, count), vectors[start : start + count], rtol=0, atol=1e-6
        ):
            return False
    return True
