"""``kdprompt bench vocab``: top-k over large class vocabularies: matrix product vs exact search vs IVF and HNSW.

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
    SCREEN_MAX_QUERIES,
    build_index,
    plan_index,
    probe_queries,
    recall_at,
    screen_of,
    search,
    time_search,
    tune,
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
APPROXIMATE = ("ivf", "hnsw")


def _time_matmul(features: torch.Tensor, queries: torch.Tensor, k: int, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        probs = (100.0 * queries @ features.T).softmax(dim=-1)
        probs.topk(k, dim=-1)
        best = min(best, time.perf_counter() - start)
    return best


def bench_vocabulary(
    num_classes: int,
    dim: int,
    batch: int = 64,
    k: int = 5,
    repeats: int = 3,
    vocabulary: str = "random",
    approximate: tuple[str, ...] = APPROXIMATE,
) -> dict[str, Any]:
    """One row of the table: latency (ms per batch) and memory (MiB) of each method, approximate recall.

    ``vocabulary``: ``random`` unit vectors, or ``clustered`` ones (about 100 classes per centre).
    ``approximate``: the approximate indexes built and timed (``ivf``, ``hnsw``).
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
    row["exact_screen"] = batch <= SCREEN_MAX_QUERIES and screen_of(flat) is not None
    # The vectors (read in place) plus one chunk of scores, and the bfloat16 screen's copy when it ran.
    screen_bytes = vectors.size * 2 if row["exact_screen"] else 0
    row["exact_mib"] = (vectors.nbytes + screen_bytes + 4 * batch * min(num_classes, EXACT_CHUNK)) * mib
    _, truth = flat.search(queries, 5)
    del flat
    for kind in approximate:
        row.update(_bench_approximate(kind, vectors, queries, truth, k, repeats))
    return row


def _bench_approximate(
    kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, repeats: int
) -> dict[str, Any]:
    """Build time (tuning included), search ms, MiB and recall@1/@5 of an ``ivf`` or ``hnsw`` index."""
    num_classes, dim = vectors.shape
    plan = plan_index(num_classes, kind)
    start = time.perf_counter()
    index = build_index(vectors, plan)
    tuned = tune(index, vectors)
    row: dict[str, Any] = {f"{kind}_build_s": time.perf_counter() - start}
    row[f"{kind}_ms"] = 1e3 * time_search(index, queries, k, repeats)
    if kind == "ivf":
        row["ivf_breadth"] = f"{plan.nlist}/{tuned['nprobe']}"
        # Vectors, their 8-byte ids in the inverted lists and the centroids.
        extra = 8 * num_classes + 4 * plan.nlist * dim
    else:
        row["hnsw_breadth"] = f"{plan.m}/{tuned['ef_search']}"
        # Vectors and the graph's 4-byte links: 2M on the base layer, M per upper level (1 node in M).
        extra = 4 * num_classes * (2 * plan.m + 1)
    row[f"{kind}_mib"] = (vectors.nbytes + extra) / 2**20
    _, found = index.search(queries, 5)
    row[f"{kind}_recall@1"], row[f"{kind}_recall@5"] = recall_at(found, truth, 1), recall_at(found, truth, 5)
    return row


def bench_vocab(
    sizes: tuple[int, ...] = (1_000, 100_000, 1_000_000),
    dims: tuple[int, ...] = (512, 768),
    batch: int = 64,
    k: int = 5,
    repeats: int = 3,
    vocabularies: tuple[str, ...] = ("random",),
    approximate: tuple[str, ...] = APPROXIMATE,
) -> list[dict[str, Any]]:
    """Every (vocabulary, width, size) row of the vocabulary benchmark, smallest first."""
    return [
        bench_vocabulary(n, d, batch=batch, k=k, repeats=repeats, vocabulary=v, approximate=approximate)
        for v in vocabularies
        for d in dims
        for n in sorted(sizes)
    ]


def vocab_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (``-`` for an approximate index not built)."""
    head = (
        "| vocabulary | classes | dim | matmul+softmax ms | MiB | FAISS flat ms | MiB | exact top-k ms | MiB "
        "| IVF ms | MiB | nlist/nprobe | IVF recall@1 | @5 | IVF build s "
        "| HNSW ms | MiB | M/efSearch | HNSW recall@1 | @5 | HNSW build s |"
    )
    lines = [head, "|" + "---|" * 21]
    for r in rows:
        exact = f"{r['exact_ms']:.1f}" + (" (bf16 screen)" if r.get("exact_screen") else "")
        cells = [
            r["vocabulary"],
            f"{r['classes']:,}",
            str(r["dim"]),
            f"{r['matmul_ms']:.1f}",
            f"{r['matmul_mib']:.0f}",
            f"{r['flat_ms']:.1f}",
            f"{r['flat_mib']:.0f}",
            exact,
            f"{r['exact_mib']:.0f}",
        ]
        for kind in APPROXIMATE:
            if f"{kind}_ms" not in r:
                cells += ["-"] * 6
                continue
            cells += [
                f"{r[f'{kind}_ms']:.1f}",
                f"{r[f'{kind}_mib']:.0f}",
                r[f"{kind}_breadth"],
                f"{r[f'{kind}_recall@1']:.3f}",
                f"{r[f'{kind}_recall@5']:.3f}",
                f"{r[f'{kind}_build_s']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
