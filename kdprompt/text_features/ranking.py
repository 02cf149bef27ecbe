"""Top-k over a class vocabulary through FAISS: which index to build, how to search it, honest probabilities.

A vocabulary is a matrix of unit-length class features. Ranking goes through a FAISS index: exact
(``IndexFlatIP``, the same inner products as a matrix product) by default, or an approximate one for
vocabularies past :data:`APPROX_MIN_CLASSES`: a graph (``IndexHNSWFlat``, what ``auto`` tries) or an
inverted-file index (``IndexIVFFlat``, only when asked). Its search breadth (``efSearch``, ``nprobe``) is
tuned at build time to a recall target measured against exact search (the figures go into the cache
manifest).

Probabilities: up to :data:`FULL_SOFTMAX_MAX_CLASSES` classes every class is scored and the softmax is
the usual one over the whole vocabulary. Past it only the top :data:`CANDIDATES` retrieved classes are
scored and the softmax runs over them (``probabilities: "candidates"``): each is then a probability
among the retrieved candidates, an upper bound of its full-vocabulary probability. An approximate index
scores only the classes it reaches (the lists an IVF index probes, the graph nodes an HNSW search
visits), so a small vocabulary behind one is ``candidates`` too unless every class was reached.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import torch

from kdprompt.errors import KdpromptError

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "hnsw")

# From `kdprompt bench vocab` (docs/VOCABULARY.md): an approximate index first beats the exact search at
# 100,000 classes of a structured vocabulary; below, exact is as fast and costs no recall. `auto` tries
# HNSW from here and keeps it only where it measures faster than exact at the recall target
# (text_features.index.planned_index).
APPROX_MIN_CLASSES = 100_000
FULL_SOFTMAX_MAX_CLASSES = 10_000
CANDIDATES = 100
RECALL_TARGET = 0.95
# `auto` keeps an approximate index only when it also searches at least this much faster than exact search:
# a smaller gain is within what another machine or load can swing, and it still costs recall.
MIN_APPROX_SPEEDUP = 2.0
RECALL_QUERIES = 256
EXACT_CHUNK = 65536  # classes scored per matrix product by the exact search (bounds its memory)
# FAISS 1.15 computes inner products with BLAS only from 128,000 queries at once, and one query vector at
# a time below: 3.5x slower for a batch of 64 (`kdprompt bench vocab`). A batch of 20 already gains.
faiss.cvar.distance_compute_blas_threshold = 20
QUERY_COSINE = 0.3  # CLIP's typical image-text cosine: recall is measured on queries this close to a class
# A GPU index returns at most this many neighbours (and probes at most this many lists) per query.
GPU_MAX_K = 2048
# HNSW graph: 32 links per node (64 on the base layer: 256 bytes a class beside a 128-d vector's 512) and
# a construction beam of 40 (FAISS's default). Measured on a clustered 100k x 128 vocabulary: 0.94 recall@1
# at efSearch 512, ~0.9 ms a query, built in 4 s on 2 threads.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
# efSearch (the search beam) is tuned over powers of two from FAISS's default, 16, to 4096. FAISS 1.15
# does not widen the beam to k: asked for 100 classes at efSearch 16 it returns ~95, with efSearch 16's
# recall, so the tuned value is what serving gets. A query computes up to about efSearch x 2M inner
# products: at 4096 that is 262,144, more than an exact search of 100,000 classes does.
EF_SEARCH_MIN = 16
EF_SEARCH_MAX = 4096


@dataclass(frozen=True)
class IndexPlan:
    """What index to build for a vocabulary.

    Attributes:
        kind: ``flat`` (exact), ``ivf`` (inverted lists) or ``hnsw`` (a graph; both approximate).
        nlist: inverted lists (``ivf`` only).
        nprobe: lists searched per query (``ivf`` only; tuned at build time).
        m: links per graph node (``hnsw`` only; twice as many on the base layer).
        ef_construction: candidates kept while linking a node (``hnsw`` only).
        ef_search: candidates kept per query (``hnsw`` only; tuned at build time).
    """

    kind: IndexKind
    nlist: int = 0
    nprobe: int = 0
    m: int = 0
    ef_construction: int = 0
    ef_search: int = 0

    def to_manifest(self) -> dict[str, Any]:
        """The plan as the manifest records it: the kind and only the fields that apply to it."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in PLAN_FIELDS[self.kind]}}


PLAN_FIELDS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist", "nprobe"),
    "hnsw": ("m", "ef_construction", "ef_search"),
}


def plan_index(num_classes: int, kind: str = "auto") -> IndexPlan:
    """The index for ``num_classes`` classes: ``auto`` is exact below :data:`APPROX_MIN_CLASSES`, else HNSW.

    ``auto``'s HNSW is a candidate: :func:`kdprompt.text_features.index.planned_index` keeps it only where
    it measures faster than exact search at the recall target. IVF is built only when asked for.

    Raises:
        KdpromptError: an unknown kind.
    """
    if kind not in INDEX_KINDS:
        raise KdpromptError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    if kind == "flat" or (kind == "auto" and num_classes < APPROX_MIN_CLASSES):
        return IndexPlan("flat")
    if kind in ("auto", "hnsw"):
        return IndexPlan("hnsw", m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=EF_SEARCH_MIN)
    # ~4 sqrt(N) lists (FAISS's guideline): short lists, so few vectors are scanned per probe; at least 1,
    # at most N / 39 (FAISS wants >= 39 training points per centroid).
    nlist = max(1, min(4 * int(math.sqrt(num_classes)), num_classes // 39))
    return IndexPlan("ivf", nlist=nlist, nprobe=1)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(features: torch.Tensor | np.ndarray, plan: IndexPlan, seed: int = 0) -> Any:
    """A FAISS inner-product index over the rows of ``features`` (float32), as ``plan`` says."""
    vectors = _as_numpy(features)
    dim = vectors.shape[1]
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, plan.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.ef_construction
        index.add(vectors)
        index.hnsw.efSearch = max(1, plan.ef_search)
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    # 50 points per list train the centroids as well as all of them would, at a fraction of the time.
    sample = np.random.default_rng(seed).choice(
        len(vectors), min(len(vectors), 50 * plan.nlist), replace=False
    )
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = max(1, plan.nprobe)
    return index


def probe_queries(features: torch.Tensor | np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Unit queries at cosine :data:`QUERY_COSINE` to random classes (stand-ins for image features)."""
    vectors = _as_numpy(features)
    rng = np.random.default_rng(seed)
    targets = vectors[rng.integers(0, len(vectors), count)]
    noise = rng.standard_normal(targets.shape).astype(np.float32)
    noise -= (noise * targets).sum(1, keepdims=True) * targets  # orthogonal to the target
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return np.ascontiguousarray(QUERY_COSINE * targets + math.sqrt(1 - QUERY_COSINE**2) * noise)


def recall_at(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-``k`` that the approximate top-``k`` holds."""
    hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(found, exact, strict=True)]
    return float(np.mean(hits))


def tune_nprobe(
    index: Any, features: torch.Tensor | np.ndarray, target: float = RECALL_TARGET
) -> dict[str, Any]:
    """Set an IVF index's smallest power-of-two ``nprobe`` reaching ``target`` recall@1; see :func:`tune`."""
    ivf = faiss.extract_index_ivf(index)
    return _tune(
        index, features, target, "nprobe", _doublings(1, ivf.nlist), lambda n: setattr(ivf, "nprobe", n)
    )


def tune_ef_search(
    index: Any, features: torch.Tensor | np.ndarray, target: float = RECALL_TARGET
) -> dict[str, Any]:
    """Set an HNSW index's smallest power-of-two ``efSearch`` reaching ``target`` recall@1; see :func:`tune`.

    Tried from :data:`EF_SEARCH_MIN` to :data:`EF_SEARCH_MAX`: ``efSearch`` ends at the cap when no value
    reaches the target.
    """
    hnsw = faiss.downcast_index(index).hnsw
    values = _doublings(EF_SEARCH_MIN, EF_SEARCH_MAX)
    return _tune(index, features, target, "ef_search", values, lambda ef: setattr(hnsw, "efSearch", ef))


def tune(index: Any, features: torch.Tensor | np.ndarray, target: float = RECALL_TARGET) -> dict[str, Any]:
    """Tune an approximate index's search breadth to ``target`` recall@1; return the manifest's figures.

    The breadth (IVF ``nprobe``, HNSW ``efSearch``) grows in powers of two until recall@1 against exact
    search on :func:`probe_queries` reaches ``target``, or it reaches its cap. The figures (the breadth,
    recall@1, recall@5, the number of queries) belong in the manifest, so users see what the index trades.
    """
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return tune_ef_search(index, features, target)
    return tune_nprobe(index, features, target)


def _doublings(start: int, cap: int) -> Iterator[int]:
    """``start``, twice that, ... while below ``cap``, then ``cap`` itself."""
    value = start
    while value < cap:
        yield value
        value *= 2
    yield cap


def _tune(
    index: Any,
    features: torch.Tensor | np.ndarray,
    target: float,
    knob: str,
    values: Iterator[int],
    apply: Callable[[int], None],
) -> dict[str, Any]:
    """Apply each of ``values`` in turn until recall@1 reaches ``target``; the figures of the last one."""
    vectors = _as_numpy(features)
    queries = probe_queries(vectors, RECALL_QUERIES)
    _, truth = exact_search(vectors, queries, 5)
    for value in values:
        apply(value)
        _, found = index.search(queries, 5)
        r1, r5 = recall_at(found, truth, 1), recall_at(found, truth, 5)
        if r1 >= target:
            break
    return {knob: value, "recall@1": r1, "recall@5": r5, "recall_queries": len(queries)}


@dataclass
class Ranking:
    """The top classes of each query.

    Attributes:
        ids: (B, k) class indices, best first.
        scores: (B, k) cosine similarities.
        probs: (B, k) softmax of ``logit_scale * scores`` over the whole vocabulary or the candidates.
        probabilities: ``full`` (every class scored) or ``candidates`` (softmax over the retrieved ones).
    """

    ids: np.ndarray
    scores: np.ndarray
    probs: np.ndarray
    probabilities: Literal["full", "candidates"]


def rank(index: Any, queries: torch.Tensor | np.ndarray, k: int, logit_scale: float) -> Ranking:
    """Top-``k`` classes of unit ``queries`` through ``index``, with honest probabilities.

    Up to :data:`FULL_SOFTMAX_MAX_CLASSES` classes every class is scored, so the softmax is the full
    one; past it the softmax runs over the top :data:`CANDIDATES` retrieved classes. An approximate
    index may return fewer than ``k`` classes for a query: the missing ones have id -1 and probability 0.

    Raises:
        KdpromptError: a GPU index asked for more than :data:`GPU_MAX_K` classes.
    """
    x = _as_numpy(queries)
    total = index.ntotal
    k = max(1, min(k, total))
    full = total <= FULL_SOFTMAX_MAX_CLASSES
    wanted = searched_k(total, k)
    if wanted > GPU_MAX_K and _on_gpu(index):
        raise KdpromptError(
            f"a GPU FAISS index returns at most {GPU_MAX_K} classes per image, {wanted} were asked for; "
            f"ask for at most {GPU_MAX_K} (--k) or run on the CPU (--device cpu)"
        )
    scores, ids = search(index, x, wanted)
    # An approximate index may return fewer than asked (id -1, score -FLT_MAX): they get probability 0.
    found = ids >= 0
    logits = np.where(found, logit_scale * np.where(found, scores, 0).astype(np.float64), -np.inf)
    best = logits.max(axis=1, keepdims=True)
    probs = np.exp(logits - np.where(np.isfinite(best), best, 0))
    probs /= np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return Ranking(
        ids=ids[:, :k],
        scores=scores[:, :k],
        probs=probs[:, :k].astype(np.float32),
        # Full only when every class was scored: an approximate index leaves out the classes it did not reach.
        probabilities="full" if full and bool((ids >= 0).all()) else "candidates",
    )


def searched_k(total: int, k: int) -> int:
    """How many classes :func:`rank` searches for to return ``k`` of ``total``: all for a full softmax."""
    k = max(1, min(k, total))
    return total if total <= FULL_SOFTMAX_MAX_CLASSES else max(k, min(CANDIDATES, total))


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the top ``k`` classes: chunked matrix products for a CPU flat index, else FAISS.

    A large CPU flat index is searched exactly with a bfloat16 screen (:func:`exact_search`) where the CPU
    multiplies bfloat16 natively.
    """
    x = _as_numpy(queries)
    if not _is_cpu_flat(index):
        return index.search(x, k)
    # A larger batch is not screened (exact_search): do not make the screen's bfloat16 copy for it.
    screen = screen_of(index) if len(x) <= SCREEN_MAX_QUERIES else None
    return exact_search(_flat_vectors(index), x, k, screen=screen)


def _is_cpu_flat(index: Any) -> bool:
    return not _on_gpu(index) and isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _flat_vectors(index: Any) -> np.ndarray:
    """A CPU flat index's vectors, read in place (``get_xb``), not copied."""
    flat = faiss.downcast_index(index)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


@dataclass(frozen=True)
class Screen:
    """A bfloat16 copy of a vocabulary's vectors, scored first to shortlist the classes scored exactly.

    Attributes:
        vectors: (C, D) bfloat16.
        max_norm: the largest float32 vector norm (1 for a cache's unit features): scales the error bound.
    """

    vectors: torch.Tensor
    max_norm: float


# A bfloat16 number keeps 8 significant bits (unit roundoff u = 2^-8). Each product of rounded components
# is within (2u + u^2) of its size, and the bfloat16 result is rounded once more (u of a score at most 1):
# by Cauchy-Schwarz a bfloat16 score of unit vectors is within 3.02u = 0.0118 of the float32 one. With
# margin, per unit of query norm and of the largest class-vector norm:
SCREEN_ERROR = 0.0125
# Classes kept per query by the screen beyond k. At 1M random 128-d classes about 300 lie within 2 x
# SCREEN_ERROR below the 100th best: fewer kept would send queries back to the float32 search.
SCREEN_EXTRA = 512
# The screen pays only where exact search reads many vectors per query and the CPU has bfloat16 dot
# products (AVX512-BF16 / AMX): 1M x 128, batch 8, 1 thread: 57 ms bfloat16 vs 155 ms float32.
SCREEN_MIN_CLASSES = 100_000
# The screen saves reading bytes, which bounds a small batch; from about 32 queries the products are
# bound by arithmetic, where this CPU's bfloat16 is no faster (1 thread, 100k x 512: 1.39x at 1 query,
# 1.62x at 8, 0.97x at 32, 0.87x at 64 with k = 100; 1M x 128: 1.78x, 1.69x, 1.38x, 1.43x). Serving's
# micro-batches and `predict`'s few images are screened; larger batches (eval) are not.
SCREEN_MAX_QUERIES = 16
# A top-k of k + 512 per chunk of 65,536 classes costs 3x one over 1M (1 thread: 42 vs 13 ms for 8 queries):
# the screen takes larger chunks (bfloat16 scores: 4 MiB for 8 queries).
SCREEN_CHUNK = 262_144


def make_screen(vectors: np.ndarray) -> Screen | None:
    """The bfloat16 :class:`Screen` of ``vectors``, or None where it does not pay: fewer than
    :data:`SCREEN_MIN_CLASSES` classes, or no native bfloat16 on this CPU."""
    if len(vectors) < SCREEN_MIN_CLASSES or not _native_bf16():
        return None
    table = torch.from_numpy(vectors)
    norm = max(float(chunk.norm(dim=1).max()) for chunk in table.split(EXACT_CHUNK))
    return Screen(table.to(torch.bfloat16), norm)


# Each index's screen, made once and dropped with the index (FAISS refuses new attributes on an index).
_SCREENS: weakref.WeakKeyDictionary[Any, Screen | None] = weakref.WeakKeyDictionary()


def screen_of(index: Any) -> Screen | None:
    """:func:`make_screen` of a CPU flat index's vectors, made once per index."""
    if index not in _SCREENS:
        _SCREENS[index] = make_screen(_flat_vectors(index))
    return _SCREENS[index]


def _native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    return any(
        bool(getattr(cpu, probe, lambda: False)())
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def _chunked_top(
    queries: torch.Tensor, vectors: torch.Tensor, k: int, chunk: int = EXACT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of ``queries @ vectors.T`` per query (scores as float32), ``chunk`` classes at a time."""
    best_scores = torch.empty(len(queries), 0)
    best_ids = torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, len(vectors), chunk):
        scores = queries @ vectors[start : start + chunk].T
        top_scores, top_ids = scores.topk(min(k, scores.shape[1]), dim=1)  # in the scores' own dtype
        merged = torch.cat([best_scores, top_scores.float()], dim=1)
        merged_ids = torch.cat([best_ids, top_ids + start], dim=1)
        best_scores, order = merged.topk(min(k, merged.shape[1]), dim=1)
        best_ids = merged_ids.gather(1, order)
    return best_scores, best_ids


def exact_search(
    vectors: np.ndarray, x: np.ndarray, k: int, screen: Screen | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of ``x @ vectors.T`` per query, as chunked matrix products + top-k: exact search.

    The same inner products and ranking as ``IndexFlatIP.search``, with memory at one chunk of scores.
    Which is faster depends on the CPU's BLAS (`kdprompt bench vocab`, docs/VOCABULARY.md): torch's was
    3x faster than faiss-cpu's for a batch of 64 on one machine, 1.4x slower on another.

    With a ``screen`` (and at most :data:`SCREEN_MAX_QUERIES` queries), the bfloat16 copy is scored first
    (half the bytes read: exact search of a large vocabulary is bound by memory bandwidth), the best ``k``
    + :data:`SCREEN_EXTRA` classes are scored again in float32, and the top ``k`` of those are returned. The result is still exact: a class left out scores
    at most its bfloat16 cut-off + :data:`SCREEN_ERROR` in float32, and a query whose k-th float32 score does
    not clear that bound is searched again in float32 alone.
    """
    queries = torch.from_numpy(_as_numpy(x))
    table = torch.from_numpy(vectors)
    shortlist = k + SCREEN_EXTRA
    if screen is None or shortlist >= len(vectors) or len(queries) > SCREEN_MAX_QUERIES:
        scores, ids = _chunked_top(queries, table, k)
        return scores.numpy(), ids.numpy()
    cut_scores, cut_ids = _chunked_top(queries.to(torch.bfloat16), screen.vectors, shortlist, SCREEN_CHUNK)
    exact = torch.einsum("bd,bmd->bm", queries, table[cut_ids])
    scores, order = exact.topk(k, dim=1)
    ids = cut_ids.gather(1, order)
    bound = cut_scores[:, -1] + SCREEN_ERROR * queries.norm(dim=1) * screen.max_norm
    unsure = (scores[:, -1] <= bound).nonzero().flatten()
    if len(unsure):
        scores[unsure], ids[unsure] = _chunked_top(queries[unsure], table, k)
    return scores.numpy(), ids.numpy()


def time_search(
    index: Any,
    queries: np.ndarray,
    k: int,
    repeats: int = 3,
    searcher: Callable[[Any, np.ndarray, int], Any] | None = None,
) -> float:
    """Best wall-clock seconds of one search of ``queries`` for ``k`` over ``repeats``.

    ``searcher(index, queries, k)`` searches; default FAISS's own ``index.search`` (pass :func:`search`
    to time the path :func:`rank` takes: for a CPU flat index, :func:`exact_search`).
    """
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        if searcher is None:
            index.search(queries, k)
        else:
            searcher(index, queries, k)
        best = min(best, time.perf_counter() - start)
    return best


def _on_gpu(index: Any) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def fits_gpu(index: Any) -> bool:
    """Whether :func:`rank` can search ``index`` on a GPU: at most :data:`GPU_MAX_K` results and probes.

    A full softmax searches every class, so a vocabulary between :data:`GPU_MAX_K` and
    :data:`FULL_SOFTMAX_MAX_CLASSES` classes stays on the CPU, as does an IVF index probing too many lists.
    An HNSW index always does: faiss-gpu has no HNSW index to copy it to.
    """
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return False
    ivf = faiss.try_extract_index_ivf(index)
    return searched_k(index.ntotal, 1) <= GPU_MAX_K and (ivf is None or ivf.nprobe <= GPU_MAX_K)


def index_to_device(index: Any, device: torch.device | str) -> Any:
    """The index on ``device``'s GPU when FAISS was built with GPU support (faiss-gpu), else unchanged.

    An index :func:`rank` could not search on a GPU (see :func:`fits_gpu`) stays on the CPU.
    """
    device = torch.device(device)
    if (
        device.type != "cuda"
        or not hasattr(faiss, "StandardGpuResources")
        or faiss.get_num_gpus() < 1
        or not fits_gpu(index)
    ):
        return index
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
    # Keep the resources alive as long as the index. FAISS 1.15 refuses unknown attributes on an index
    # (AttributeError); `referenced_objects` is the one it keeps for this purpose.
    gpu_index.referenced_objects = [*getattr(gpu_index, "referenced_objects", []), resources]
    return gpu_index
