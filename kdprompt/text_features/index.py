"""The cache's FAISS index over the (unit-length) class features: flat (exact), HNSW or IVF, as recorded.

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
from kdprompt.text_features.ranking import (
    MIN_APPROX_SPEEDUP,
    RECALL_QUERIES,
    RECALL_TARGET,
    IndexPlan,
    build_index,
    exact_search,
    plan_index,
    probe_queries,
    search,
    searched_k,
    time_search,
    tune,
)

# Rows compared at a time when checking an index's vectors: bounded memory for any vocabulary.
CHECK_ROWS = 65_536


def flat_index(features: torch.Tensor) -> Any:
    """A ``faiss.IndexFlatIP`` holding the rows of ``features`` as float32."""
    return build_index(features, IndexPlan("flat"))


# The speed comparison: a batch of this many recall queries (more than ranking.SCREEN_MAX_QUERIES), best
# of this many searches, for the classes `kdprompt predict` asks for by default (as many as rank()
# searches to return them).
SPEED_BATCH = 64
SPEED_REPEATS = 3
SPEED_K = 5


def planned_index(features: torch.Tensor, kind: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The index ``kind`` (auto, flat, hnsw, ivf) plans for ``features``, and its manifest entry.

    An approximate index gets the smallest search breadth (HNSW ``efSearch``, IVF ``nprobe``) reaching
    :data:`~kdprompt.text_features.ranking.RECALL_TARGET` recall@1 against exact search; the entry records
    it with the measured recall. With ``auto`` past the size threshold an HNSW index is built and kept
    only if it reaches the target within its ``efSearch`` cap and searches at least
    :data:`~kdprompt.text_features.ranking.MIN_APPROX_SPEEDUP` times faster than exact search
    (:func:`measure_speedup`); otherwise exact search is kept and the entry says why
    (``hnsw_rejected``). An HNSW entry records its measured ``speedup`` either way; IVF (only built when
    asked for) is kept as measured.

    Raises:
        KdpromptError: an unknown kind.
    """
    plan = plan_index(int(features.shape[0]), kind)
    index = build_index(features, plan)
    if plan.kind == "flat":
        return index, dict(FLAT_ENTRY)
    entry = {**plan.to_manifest(), **tune(index, features)}
    if plan.kind == "ivf":
        return index, entry  # an IVF index is only built when asked for: kept as measured
    entry["speedup"] = measure_speedup(index, features)
    if kind == "auto" and (entry["recall@1"] < RECALL_TARGET or entry["speedup"] < MIN_APPROX_SPEEDUP):
        # Too slow or not accurate enough (vectors without structure, e.g. random ones, need most of the
        # graph searched): `auto` keeps exact search and says why.
        rejected = {k: v for k, v in entry.items() if k != "kind"}
        del index  # the graph holds its own copy of the vectors: free it before the flat index takes one
        return build_index(features, IndexPlan("flat")), {**FLAT_ENTRY, "hnsw_rejected": rejected}
    return index, entry


def measure_speedup(index: Any, features: torch.Tensor) -> float:
    """How many times faster ``index`` searches than exact search, as :func:`~ranking.rank` searches.

    Both search the first :data:`SPEED_BATCH` recall queries as one batch (best of :data:`SPEED_REPEATS`);
    exact search is the path a flat index takes (:func:`~ranking.exact_search`, over the features in place).
    Rounded to 2 decimals, the figure the manifest records and ``auto`` decides on.
    """
    vectors = features.detach().float().cpu().contiguous().numpy()
    queries = probe_queries(vectors, RECALL_QUERIES)[:SPEED_BATCH]
    k = searched_k(len(vectors), SPEED_K)
    approx = time_search(index, queries, k, SPEED_REPEATS, searcher=search)
    # rank()'s exact path for a batch this size: float32 alone (no screen past SCREEN_MAX_QUERIES queries).
    exact = time_search(vectors, queries, k, SPEED_REPEATS, searcher=exact_search)
    return round(exact / max(approx, 1e-9), 2)


def index_kind(index: Any) -> str:
    """``flat``, ``ivf``, ``hnsw``, or the FAISS class name of any other index."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    return type(index).__name__


def read_index(path: Path, features: torch.Tensor, manifest: dict[str, Any]) -> Any:
    """Read ``index.faiss`` of the cache directory ``path`` and check it is the manifest's, over ``features``.

    The index must rank by inner product, be the kind the manifest's ``index`` entry names (flat when
    there is none), with its ``nlist`` for IVF or ``m`` for HNSW, and hold exactly the cache's features. The
    entry's search breadth is set on it: ``nprobe`` for IVF, ``efSearch`` for HNSW.

    Raises:
        KdpromptError: the file is missing or unreadable, another kind or shape than the manifest says, or
            stale (other size or vectors).
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
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:  # e.g. L2: scores would be distances, not cosines
        metric = (
            "L2 distance" if index.metric_type == faiss.METRIC_L2 else f"FAISS metric {index.metric_type}"
        )
        raise KdpromptError(
            f"{file} ranks by {metric}, not by inner product: the index does not belong to this cache; {hint}"
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
    if kind == "hnsw":
        hnsw = faiss.downcast_index(index).hnsw
        m = hnsw.nb_neighbors(1)  # links per node on the upper layers: the M it was built with
        if m != entry["m"]:
            raise KdpromptError(
                f"{file} is an HNSW graph with M {m} but the cache manifest says M {entry['m']}: the index "
                f"does not belong to this cache; {hint}"
            )
        hnsw.efSearch = entry["ef_search"]
    if not _holds(index, features):
        raise KdpromptError(f"{file} does not hold this cache's features: the index is stale; {hint}")
    return index


def _holds(index: Any, features: torch.Tensor) -> bool:
    """Whether row ``i`` of the index is row ``i`` of ``features`` for every ``i`` (all kinds store rows)."""
    vectors = features.numpy()
    for start in range(0, len(vectors), CHECK_ROWS):
        count = min(CHECK_ROWS, len(vectors) - start)
        if not np.allclose(
            index.reconstruct_n(start, count), vectors[start : start + count], rtol=0, atol=1e-6
        ):
            return False
    return True
