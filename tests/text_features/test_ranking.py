"""Top-k through FAISS: exact equals the matrix product, recall is measured, probabilities are honest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdprompt.apps.bench_vocab import bench_vocabulary, random_vocabulary, vocab_table
from kdprompt.errors import KdpromptError
from kdprompt.text_features import ranking
from kdprompt.text_features.ranking import build_index, plan_index, probe_queries, rank, tune_nprobe


def test_exact_index_returns_the_matrix_products_top_k():
    vectors = random_vocabulary(5000, 96, seed=3)
    queries = probe_queries(vectors, 64, seed=4)
    index = build_index(vectors, plan_index(len(vectors)))
    _, ids = index.search(queries, 5)
    expected = torch.from_numpy(queries @ vectors.T).topk(5, dim=1).indices.numpy()
    assert (ids == expected).mean() > 0.999  # ties aside


def test_small_vocabularies_get_the_full_softmax():
    vectors = random_vocabulary(300, 32, seed=0)
    queries = probe_queries(vectors, 8, seed=1)
    result = rank(build_index(vectors, plan_index(300)), torch.from_numpy(queries), k=5, logit_scale=50.0)
    full = torch.softmax(50.0 * torch.from_numpy(queries @ vectors.T).double(), dim=1)
    expected = full.topk(5, dim=1)
    assert result.probabilities == "full"
    np.testing.assert_array_equal(result.ids, expected.indices.numpy())
    np.testing.assert_allclose(result.probs, expected.values.numpy(), rtol=1e-5, atol=1e-7)


def test_large_vocabularies_say_their_softmax_covers_only_the_candidates(monkeypatch):
    monkeypatch.setattr(ranking, "FULL_SOFTMAX_MAX_CLASSES", 100)
    monkeypatch.setattr(ranking, "CANDIDATES", 20)
    vectors = random_vocabulary(1000, 32, seed=0)
    queries = probe_queries(vectors, 4, seed=1)
    result = rank(build_index(vectors, plan_index(1000)), queries, k=3, logit_scale=10.0)
    assert result.probabilities == "candidates"
    logits = 10.0 * np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :20]
    candidates = np.exp(logits - logits.max(1, keepdims=True))
    candidates /= candidates.sum(1, keepdims=True)
    np.testing.assert_allclose(result.probs, candidates[:, :3], rtol=1e-5)
    full = torch.softmax(10.0 * torch.from_numpy(queries @ vectors.T), dim=1).topk(3).values.numpy()
    assert (result.probs >= full - 1e-6).all()  # an upper bound of the full-vocabulary probability


def test_auto_plan_is_exact_below_the_threshold_and_hnsw_above():
    assert plan_index(ranking.APPROX_MIN_CLASSES - 1).kind == "flat"
    plan = plan_index(ranking.APPROX_MIN_CLASSES)
    assert plan == plan_index(10, "hnsw")
    assert plan.to_manifest() == {"kind": "hnsw", "m": 32, "ef_construction": 40, "ef_search": 16}
    ivf = plan_index(ranking.APPROX_MIN_CLASSES, "ivf")  # IVF only when asked for
    assert ivf.kind == "ivf" and ivf.nlist == 4 * int(ranking.APPROX_MIN_CLASSES**0.5)
    assert ivf.to_manifest() == {"kind": "ivf", "nlist": ivf.nlist, "nprobe": 1}  # as before HNSW
    assert plan_index(10**7, "flat").to_manifest() == {"kind": "flat"}
    with pytest.raises(KdpromptError, match="unknown index kind 'annoy'; use one of auto, flat, ivf, hnsw"):
        plan_index(10, "annoy")


def test_ivf_nprobe_is_tuned_to_the_recall_target_and_reports_it():
    vectors = random_vocabulary(8000, 32, seed=0)
    plan = plan_index(len(vectors), "ivf")
    index = build_index(vectors, plan)
    figures = tune_nprobe(index, vectors, target=0.9)
    assert figures["recall@1"] >= 0.9 or figures["nprobe"] == plan.nlist
    assert 1 <= figures["nprobe"] <= plan.nlist and figures["recall_queries"] == ranking.RECALL_QUERIES
    # The figure is the index's real recall: an independent measurement agrees.
    queries = probe_queries(vectors, 200, seed=9)
    _, found = index.search(queries, 1)
    truth = (queries @ vectors.T).argmax(1)
    assert abs((found[:, 0] == truth).mean() - figures["recall@1"]) < 0.1


def test_vocabulary_benchmark_rows_and_table():
    row = bench_vocabulary(2000, 16, batch=8, k=5, repeats=1, vocabulary="clustered")
    assert (
        row["classes"] == 2000
        and 0 <= row["ivf_recall@1"] <= 1
        and row["flat_ms"] > 0
        and row["exact_ms"] > 0
    )
    assert row["matmul_mib"] > row["flat_mib"]  # the full logits cost memory the index does not
    assert 0 <= row["hnsw_recall@1"] <= 1 and row["hnsw_breadth"].startswith("32/") and row["hnsw_ms"] > 0
    assert row["hnsw_mib"] > row["flat_mib"]  # the graph's links on top of the vectors
    assert "| clustered | 2,000 | 16 |" in vocab_table([row])
    only_ivf = bench_vocabulary(2000, 16, batch=8, k=5, repeats=1, approximate=("ivf",))
    assert "hnsw_ms" not in only_ivf and vocab_table([only_ivf]).rstrip(" |").endswith("- | -")


def test_vocabulary_benchmark_cli_refuses_an_unknown_index():
    from click.testing import CliRunner

    from kdprompt.cli import main

    result = CliRunner().invoke(main, ["bench", "vocab", "--classes", "100", "--approximate", "annoy"])
    assert result.exit_code == 2 and "unknown index annoy; use ivf, hnsw" in result.output


def test_exact_search_in_chunks_is_faiss_flat_search(monkeypatch):
    """The chunked matrix-product search of a CPU flat index ranks as IndexFlatIP.search does."""
    monkeypatch.setattr(ranking, "EXACT_CHUNK", 700)  # several chunks, the last one short
    vectors = random_vocabulary(3000, 48, seed=7)
    queries = probe_queries(vectors, 32, seed=8)
    index = build_index(vectors, plan_index(3000, "flat"))
    scores, ids = ranking.search(index, queries, 10)
    faiss_scores, faiss_ids = index.search(queries, 10)
    assert (ids == faiss_ids).mean() > 0.999
    np.testing.assert_allclose(scores, faiss_scores, rtol=1e-5, atol=1e-6)


def _screen(vectors: np.ndarray) -> ranking.Screen:
    return ranking.Screen(torch.from_numpy(vectors).to(torch.bfloat16), 1.0)


@pytest.mark.parametrize("k", [5, 100])
def test_bf16_screened_search_is_exact(monkeypatch, k):
    """Screening with the bfloat16 copy returns exactly the float32 search's top k."""
    monkeypatch.setattr(ranking, "SCREEN_CHUNK", 4096)  # several chunks, the last one short
    vectors = random_vocabulary(20_000, 64, seed=3)
    queries = probe_queries(vectors, ranking.SCREEN_MAX_QUERIES, seed=4)
    fallbacks = []
    top = ranking._chunked_top
    monkeypatch.setattr(ranking, "_chunked_top", lambda q, v, *a: fallbacks.append(v.dtype) or top(q, v, *a))
    scores, ids = ranking.exact_search(vectors, queries, k, screen=_screen(vectors))
    ref_scores, ref_ids = ranking.exact_search(vectors, queries, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert fallbacks[0] == torch.bfloat16  # the screen ran (the last call is the float32 reference)


def test_bf16_screen_falls_back_to_float32_when_its_bound_is_not_met(monkeypatch):
    """Near-ties below the bfloat16 resolution: the bound fails for some queries, which are searched again
    in float32, so the ranking stays exact."""
    monkeypatch.setattr(ranking, "SCREEN_EXTRA", 4)  # a short list: the bound cannot hold for most queries
    rng = np.random.default_rng(0)
    base = random_vocabulary(200, 32, seed=5)
    # 50 near-copies of each vector, apart by far less than bfloat16 resolves
    vectors = np.repeat(base, 50, axis=0) + 1e-4 * rng.standard_normal((10_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = probe_queries(vectors, 16, seed=6)
    redone = []
    top = ranking._chunked_top

    def counting(q, v, *args):
        if v.dtype == torch.float32:
            redone.append(len(q))
        return top(q, v, *args)

    monkeypatch.setattr(ranking, "_chunked_top", counting)
    scores, ids = ranking.exact_search(vectors, queries, 10, screen=_screen(vectors))
    assert redone and redone[0] > 0  # some queries went back to float32
    monkeypatch.setattr(ranking, "_chunked_top", top)
    ref_scores, ref_ids = ranking.exact_search(vectors, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_flat_index_screens_only_large_vocabularies_on_bf16_cpus(monkeypatch):
    monkeypatch.setattr(ranking, "SCREEN_MIN_CLASSES", 1000)
    small = build_index(random_vocabulary(999, 16), plan_index(999, "flat"))
    assert ranking.screen_of(small) is None
    large = build_index(random_vocabulary(1000, 16), plan_index(1000, "flat"))
    monkeypatch.setattr(ranking, "_native_bf16", lambda: False)
    assert ranking.make_screen(random_vocabulary(1000, 16)) is None
    monkeypatch.setattr(ranking, "_native_bf16", lambda: True)
    screen = ranking.screen_of(large)
    assert (
        screen is not None
        and screen.vectors.dtype == torch.bfloat16
        and screen.max_norm == pytest.approx(1.0)
    )
    assert ranking.screen_of(large) is screen  # made once per index
    other = build_index(random_vocabulary(1000, 16, seed=1), plan_index(1000, "flat"))
    ranking.search(other, probe_queries(random_vocabulary(1000, 16), ranking.SCREEN_MAX_QUERIES + 1), 5)
    assert other not in ranking._SCREENS  # a batch the screen would not serve does not make it
    ranking.search(other, probe_queries(random_vocabulary(1000, 16), 2), 5)
    assert ranking._SCREENS[other] is not None


def test_large_batches_skip_the_bf16_screen(monkeypatch):
    """Past SCREEN_MAX_QUERIES queries the products are compute-bound: the float32 search alone runs."""
    vectors = random_vocabulary(2000, 16, seed=9)
    queries = probe_queries(vectors, ranking.SCREEN_MAX_QUERIES + 1, seed=10)
    dtypes = []
    top = ranking._chunked_top
    monkeypatch.setattr(ranking, "_chunked_top", lambda q, v, *a: dtypes.append(v.dtype) or top(q, v, *a))
    ranking.exact_search(vectors, queries, 5, screen=_screen(vectors))
    assert dtypes == [torch.float32]
