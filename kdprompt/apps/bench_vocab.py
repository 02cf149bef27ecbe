"""``kdprompt bench vocab``: top-k over large class vocabularies, matrix product vs FAISS exact vs IVF.

Class vectors are unit-length, random (the worst case for an approximate index: no cluster structure to
exploit) or clustered (about 100 classes around each random centre, as families of class names are); the batch of image features are unit queries at cosine 0.3 to random classes, as CLIP image
features sit to their class text. Every method returns the top-k; the matrix product also computes the
full softmax, as ``Bundle.predict`` did before the index took over.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from kdprompt.text_features.ranking import (
    EXACT_CHUNK,
    build_index,
    plan_index,
    probe_queries,
    recall_at,
    search,
    time_search,
    tune_nprobe,
)


def random_vocabulary(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """``num_classes`` random unit vectors of width ``dim`` (float32), made in chunks to bound memory."""
    out = np.empty((num_classes, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, num_classes, 65536):
        block = rng.standard_normal((min(65536, num_classes - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def clustered_vocabulary(num_classes: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (cosine ~0.9 to their centre in high dimension).

    Real class-name embeddings have such structure (WordNet nouns, product catalogues: families of near
    names); random vectors have none and are the worst case for an approximate index.
    """
    rng = np.random.default_rng(seed)
    centres = random_vocabulary(clusters, dim, seed=seed + 1)
    out = np.empty((num_classes, dim), dtype=np.float32)
    for start in range(0, num_classes, 65536):
        n = min(65536, num_classes - start)
        block = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal(
            (n, dim), dtype=np.float32
        ) / np.sqrt(dim)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + n] = block
    return out


VOCABULARIES = ("random", "clustered")


def _time_matmul(features: torch.Tensor, queries: torch.Tensor, k: int, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        probs = (100.0 * queries @ features.T).softmax(dim=-1)
        probs.topk(k, dim=-1)
        best = min(best, time.perf_counter() - start)
    return best


def bench_vocabulary(
    num_classes: int, dim: int, batch: int = 64, k: int = 5, repeats: int = 3, vocabulary: str = "random"
) -> dict[str, Any]:
    """One row of the table: latency (ms per batch) and memory (MiB) of each method, IVF recall.

    ``vocabulary``: ``random`` unit vectors, or ``clustered`` ones (about 100 classes per centre).
    """
    if vocabulary == "clustered":
        vectors = clustered_vocabulary(num_classes, dim, clusters=max(1, num_classes // 100))
    else:
        vectors = random_vocabulary(num_classes, dim)
    queries = probe_queries(vectors, batch, seed=1)
    mib = 1 / 2**20
    row: dict[str, Any] = {"vocabulary": vocabulary, "classes": num_classes, "dim": dim, "batch": batch}

    matrix, q = torch.from_numpy(vectors), torch.from_numpy(queries)
    row["matmul_ms"] = 1e3 * _time_matmul(matrix, q, k, repeats)
    # The class matrix plus the (batch x classes) logits and probabilities the softmax materialises.
    row["matmul_mib"] = (vectors.nbytes + 2 * 4 * batch * num_classes) * mib

    flat = build_index(vectors, plan_index(num_classes, "flat"))
    row["flat_ms"] = 1e3 * time_search(flat, queries, k, repeats)
    row["flat_mib"] = (vectors.nbytes + 12 * batch * k) * mib
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        search(flat, queries, k)
        best = min(best, time.perf_counter() - start)
    row["exact_ms"] = 1e3 * best
    # The vectors (read in place) plus one chunk of scores.
    row["exact_mib"] = (vectors.nbytes + 4 * batch * min(num_classes, EXACT_CHUNK)) * mib
    _, truth = flat.search(queries, 5)
    del flat

    plan = plan_index(num_classes, "ivf")
    start = time.perf_counter()
    ivf = build_index(vectors, plan)
    tuned = tune_nprobe(ivf, vectors)
    row["ivf_build_s"] = time.perf_counter() - start
    row["ivf_nlist"], row["ivf_nprobe"] = plan.nlist, tuned["nprobe"]
    row["ivf_ms"] = 1e3 * time_search(ivf, queries, k, repeats)
    # Vectors, their 8-byte ids in the inverted lists and the centroids.
    row["ivf_mib"] = (vectors.nbytes + 8 * num_classes + 4 * plan.nlist * dim) * mib
    _, found = ivf.search(queries, 5)
    row["ivf_recall@1"], row["ivf_recall@5"] = recall_at(found, truth, 1), recall_at(found, truth, 5)
    return row


def bench_vocab(
    sizes: tuple[int, ...] = (1_000, 100_000, 1_000_000),
    dims: tuple[int, ...] = (512, 768),
    batch: int = 64,
    k: int = 5,
    repeats: int = 3,
    vocabularies: tuple[str, ...] = ("random",),
) -> list[dict[str, Any]]:
    """Every (vocabulary, width, size) row of the vocabulary benchmark, smallest first."""
    return [
        bench_vocabulary(n, d, batch=batch, k=k, repeats=repeats, vocabulary=v)
        for v in vocabularies
        for d in dims
        for n in sorted(sizes)
    ]


def vocab_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    head = (
        "| vocabulary | classes | dim | matmul+softmax ms | MiB | FAISS flat ms | MiB | exact top-k ms | MiB "
        "| IVF ms | MiB | nlist/nprobe "
        "| IVF recall@1 | @5 | IVF build s |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['vocabulary']} | {r['classes']:,} | {r['dim']} | {r['matmul_ms']:.1f} | {r['matmul_mib']:.0f} "
            f"| {r['flat_ms']:.1f} | {r['flat_mib']:.0f} | {r['exact_ms']:.1f} | {r['exact_mib']:.0f} "
            f"| {r['ivf_ms']:.1f} | {r['ivf_mib']:.0f} "
            f"| {r['ivf_nlist']}/{r['ivf_nprobe']} | {r['ivf_recall@1']:.3f} | {r['ivf_recall@5']:.3f} "
            f"| {r['ivf_build_s']:.1f} |"
        )
    return "\n".join(lines)
