"""Top-k over a class vocabulary through FAISS: which index to build, how to search it, honest probabilities.

A vocabulary is a matrix of unit-length class features. Ranking goes through a FAISS index: exact
(``IndexFlatIP``, the same inner products as a matrix product) by default, or an inverted-file index
(``IndexIVFFlat``) for vocabularies past :data:`APPROX_MIN_CLASSES`, whose ``nprobe`` is tuned at build
time to a recall target measured against the exact index (the figures go into the cache manifest).

Probabilities: up to :data:`FULL_SOFTMAX_MAX_CLASSES` classes every class is scored and the softmax is
the usual one over the whole vocabulary. Past it only the top :data:`CANDIDATES` retrieved classes are
scored and the softmax runs over them (``probabilities: "candidates"``): each is then a probability
among the retrieved candidates, an upper bound of its full-vocabulary probability. An IVF index scores
only the classes of the lists it probes, so a small vocabulary behind one is ``candidates`` too unless
every class was reached.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import faiss
import numpy as np
import torch

from kdprompt.errors import KdpromptError

IndexKind = Literal["flat", "ivf"]
INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "ivf")

# From `kdprompt bench vocab` (docs/VOCABULARY.md): IVF first beats the exact search at 100,000 classes of
# a structured vocabulary (1.7x); below, exact is as fast and costs no recall. `auto` tries IVF from here
# and keeps it only where it probes few enough lists (text_features.index.MAX_PROBED_FRACTION).
APPROX_MIN_CLASSES = 100_000
FULL_SOFTMAX_MAX_CLASSES = 10_000
CANDIDATES = 100
RECALL_TARGET = 0.95
RECALL_QUERIES = 256
EXACT_CHUNK = 65536  # classes scored per matrix product by the exact search (bounds its memory)
# FAISS 1.15 computes inner products with BLAS only from 128,000 queries at once, and one query vector at
# a time below: 3.5x slower for a batch of 64 (`kdprompt bench vocab`). A batch of 20 already gains.
faiss.cvar.distance_compute_blas_threshold = 20
QUERY_COSINE = 0.3  # CLIP's typical image-text cosine: recall is measured on queries this close to a class
# A GPU index returns at most this many neighbours (and probes at most this many lists) per query.
GPU_MAX_K = 2048


@dataclass(frozen=True)
class IndexPlan:
    """What index to build for a vocabulary.

    Attributes:
        kind: ``flat`` (exact) or ``ivf`` (inverted lists, approximate).
        nlist: inverted lists (``ivf`` only).
        nprobe: lists searched per query (``ivf`` only; tuned at build time).
    """

    kind: IndexKind
    nlist: int = 0
    nprobe: int = 0

    def to_manifest(self) -> dict[str, Any]:
        """The plan as the manifest records it."""
        return asdict(self)


def plan_index(num_classes: int, kind: str = "auto") -> IndexPlan:
    """The index for ``num_classes`` classes: ``auto`` is exact up to :data:`APPROX_MIN_CLASSES`.

    Raises:
        KdpromptError: an unknown kind.
    """
    if kind not in INDEX_KINDS:
        raise KdpromptError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    if kind == "flat" or (kind == "auto" and num_classes < APPROX_MIN_CLASSES):
        return IndexPlan("flat")
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
    """Set the smallest power-of-two ``nprobe`` whose recall@1 reaches ``target``; return the figures.

    Recall is measured against an exact search on :func:`probe_queries`; the result (nprobe, recall@1,
    recall@5, the number of queries) belongs in the manifest, so users see what the index trades.
    """
    vectors = _as_numpy(features)
    queries = probe_queries(vectors, RECALL_QUERIES)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 5)
    ivf = faiss.extract_index_ivf(index)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(queries, 5)
        r1, r5 = recall_at(found, truth, 1), recall_at(found, truth, 5)
        if r1 >= target or nprobe >= ivf.nlist:
            break
        nprobe = min(ivf.nlist, nprobe * 2)
    return {"nprobe": nprobe, "recall@1": r1, "recall@5": r5, "recall_queries": len(queries)}


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
    wanted = total if full else max(k, min(CANDIDATES, total))
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
        # Full only when every class was scored: an IVF index leaves out the lists it did not probe.
        probabilities="full" if full and bool((ids >= 0).all()) else "candidates",
    )


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the top ``k`` classes: chunked matrix products for a CPU flat index, else FAISS."""
    x = _as_numpy(queries)
    return _exact_search(index, x, k) if _is_cpu_flat(index) else index.search(x, k)


def _is_cpu_flat(index: Any) -> bool:
    return not _on_gpu(index) and isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _exact_search(index: Any, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` of a CPU flat index, as chunked matrix products + top-k over its own vectors.

    The same inner products and ranking as ``IndexFlatIP.search``, 3-10x faster for batches on CPU
    (`kdprompt bench vocab`): torch's BLAS outruns the one bundled with faiss-cpu, and memory stays at
    one chunk of scores. The vectors are read in place (``get_xb``), not copied.
    """
    flat = faiss.downcast_index(index)
    vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    queries = torch.from_numpy(x)
    best_scores = torch.empty(len(x), 0)
    best_ids = torch.empty(len(x), 0, dtype=torch.long)
    for start in range(0, flat.ntotal, EXACT_CHUNK):
        scores = queries @ torch.from_numpy(vectors[start : start + EXACT_CHUNK]).T
        top_scores, top_ids = scores.topk(min(k, scores.shape[1]), dim=1)
        merged = torch.cat([best_scores, top_scores], dim=1)
        merged_ids = torch.cat([best_ids, top_ids + start], dim=1)
        best_scores, order = merged.topk(min(k, merged.shape[1]), dim=1)
        best_ids = merged_ids.gather(1, order)
    return best_scores.numpy(), best_ids.numpy()


def time_search(index: Any, queries: np.ndarray, k: int, repeats: int = 3) -> float:
    """Best wall-clock seconds of one ``index.search(queries, k)`` over ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return best


def _on_gpu(index: Any) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def fits_gpu(index: Any) -> bool:
    """Whether :func:`rank` can search ``index`` on a GPU: at most :data:`GPU_MAX_K` results and probes.

    A full softmax searches every class, so a vocabulary between :data:`GPU_MAX_K` and
    :data:`FULL_SOFTMAX_MAX_CLASSES` classes stays on the CPU, as does an IVF index probing too many lists.
    """
    total = index.ntotal
    searched = total if total <= FULL_SOFTMAX_MAX_CLASSES else min(CANDIDATES, total)
    ivf = faiss.try_extract_index_ivf(index)
    return searched <= GPU_MAX_K and (ivf is None or ivf.nprobe <= GPU_MAX_K)


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
    gpu_index.kdprompt_resources = resources  # keep the resources alive as long as the index
    return gpu_index
