"""HNSW class-vocabulary indexes: tuned efSearch and its recorded recall, caches, refusals, auto's rule."""

from __future__ import annotations

from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

from kdprompt.apps.bench_vocab import clustered_vocabulary, random_vocabulary
from kdprompt.errors import KdpromptError
from kdprompt.text_features import INDEX_FILE, build_cache, load_cache, ranking
from kdprompt.text_features import index as index_module
from kdprompt.text_features.index import index_kind, planned_index
from kdprompt.text_features.manifest import describe_index
from kdprompt.text_features.ranking import IndexPlan, build_index, plan_index, probe_queries, recall_at
from kdprompt.text_features.store import copy_cache

FP = "a" * 64
HNSW_FIELDS = {"m", "ef_construction", "ef_search", "recall@1", "recall@5", "recall_queries", "speedup"}


def clustered_cache(path, count: int = 3000, dim: int = 32, index: str = "hnsw"):
    features = torch.from_numpy(clustered_vocabulary(count, dim, clusters=count // 100))
    names = [f"class {i:05d}" for i in range(count)]
    return build_cache(features, names, path, teacher_fingerprint=FP, logit_scale=50.0, index=index)


def test_ef_search_is_the_smallest_power_of_two_reaching_the_target():
    vectors = clustered_vocabulary(3000, 32, clusters=30)
    index = build_index(vectors, plan_index(len(vectors), "hnsw"))
    figures = ranking.tune_ef_search(index, vectors, target=0.97)
    ef = figures["ef_search"]
    assert figures["recall@1"] >= 0.97 and ef > ranking.EF_SEARCH_MIN  # this vocabulary needs a wider beam
    assert ef & (ef - 1) == 0 and index.hnsw.efSearch == ef
    # Half the beam misses the target on the same queries: ef is the smallest that reaches it.
    queries = probe_queries(vectors, ranking.RECALL_QUERIES)
    truth = (queries @ vectors.T).argmax(1)
    index.hnsw.efSearch = ef // 2
    assert (index.search(queries, 5)[1][:, 0] == truth).mean() < 0.97
    # The generic tuner dispatches to it by kind.
    assert ranking.tune(index, vectors, target=0.97) == figures


def test_ef_search_ends_at_its_cap_when_the_target_is_out_of_reach(monkeypatch):
    monkeypatch.setattr(ranking, "EF_SEARCH_MAX", 64)
    vectors = random_vocabulary(1000, 16, seed=1)
    index = build_index(vectors, plan_index(len(vectors), "hnsw"))
    figures = ranking.tune(index, vectors, target=1.01)
    assert figures["ef_search"] == 64 == index.hnsw.efSearch and figures["recall@1"] <= 1


def test_an_hnsw_cache_round_trips_at_its_recorded_recall(tmp_path):
    built = clustered_cache(tmp_path / "c")
    entry = built.manifest["index"]
    assert entry["kind"] == "hnsw" and set(entry) == {"kind", *HNSW_FIELDS}
    assert (entry["m"], entry["ef_construction"]) == (ranking.HNSW_M, ranking.HNSW_EF_CONSTRUCTION)
    assert entry["recall@1"] >= ranking.RECALL_TARGET or entry["ef_search"] == ranking.EF_SEARCH_MAX
    assert entry["speedup"] > 0 and entry["recall_queries"] == ranking.RECALL_QUERIES

    # The file's own efSearch is not trusted: the manifest's is set when the cache is read.
    index = faiss.read_index(str(tmp_path / "c" / INDEX_FILE))
    index.hnsw.efSearch = 1
    faiss.write_index(index, str(tmp_path / "c" / INDEX_FILE))
    cache = load_cache(tmp_path / "c")
    assert index_kind(cache.index) == "hnsw" and cache.index.hnsw.efSearch == entry["ef_search"]

    # Its top-k is exact search's at the recorded recall, on queries it was not tuned on.
    queries = probe_queries(cache.features, 400, seed=5)
    _, found = cache.search(queries, 5)
    truth = torch.from_numpy(queries @ cache.features.numpy().T).topk(5, dim=1).indices.numpy()
    assert abs(recall_at(found, truth, 1) - entry["recall@1"]) < 0.05
    assert abs(recall_at(found, truth, 5) - entry["recall@5"]) < 0.05
    np.testing.assert_array_equal(found, built.search(queries, 5)[1])  # as the index it was built with
    assert "hnsw (approximate: M 32, efSearch" in describe_index(entry)


def test_an_index_with_another_m_than_the_manifest_is_refused(tmp_path):
    cache = clustered_cache(tmp_path / "c")
    other = IndexPlan("hnsw", m=16, ef_construction=ranking.HNSW_EF_CONSTRUCTION, ef_search=16)
    faiss.write_index(build_index(cache.features, other), str(tmp_path / "c" / INDEX_FILE))
    with pytest.raises(KdpromptError) as err:
        load_cache(tmp_path / "c")
    message = str(err.value)
    assert (
        f"{tmp_path / 'c' / INDEX_FILE} is an HNSW graph with M 16 but the cache manifest says M 32"
        in message
    )
    assert "kdprompt cache" in message


def test_a_stale_hnsw_index_is_refused(tmp_path):
    cache = clustered_cache(tmp_path / "c")
    other = torch.nn.functional.normalize(torch.randn(3000, 32), dim=-1)
    faiss.write_index(build_index(other, plan_index(3000, "hnsw")), str(tmp_path / "c" / INDEX_FILE))
    with pytest.raises(KdpromptError, match="does not hold this cache's features: the index is stale"):
        load_cache(tmp_path / "c")
    assert cache.index.ntotal == 3000


def test_an_index_that_ranks_by_distance_is_refused(tmp_path):
    cache = clustered_cache(tmp_path / "c", index="flat")
    l2 = faiss.IndexFlatL2(32)
    l2.add(cache.features.numpy())  # the same vectors: only the metric is wrong
    faiss.write_index(l2, str(tmp_path / "c" / INDEX_FILE))
    with pytest.raises(KdpromptError, match="ranks by L2 distance, not by inner product"):
        load_cache(tmp_path / "c")


def test_copy_cache_builds_hnsw_when_asked_and_auto_keeps_it(tmp_path):
    source = clustered_cache(tmp_path / "c", index="flat")
    hnsw = copy_cache(load_cache(tmp_path / "c"), tmp_path / "hnsw", "hnsw")
    assert hnsw.manifest["index"]["kind"] == "hnsw"
    assert hnsw.manifest["features_sha256"] == source.manifest["features_sha256"]
    kept = copy_cache(load_cache(tmp_path / "hnsw"), tmp_path / "auto")
    assert kept.manifest == hnsw.manifest
    assert (tmp_path / "auto" / INDEX_FILE).read_bytes() == (tmp_path / "hnsw" / INDEX_FILE).read_bytes()
    subset = load_cache(tmp_path / "auto").subset(source.classnames[:10])
    assert subset.manifest["index"] == {"kind": "flat"} and index_kind(subset.index) == "flat"


def test_auto_past_the_threshold_keeps_hnsw_exactly_when_the_rule_says(monkeypatch):
    """Whatever this machine measures, the entry's figures and the decision agree with the rule."""
    monkeypatch.setattr(ranking, "APPROX_MIN_CLASSES", 1000)
    for vectors in (random_vocabulary(2000, 32, seed=2), clustered_vocabulary(2000, 32, clusters=20)):
        index, entry = planned_index(torch.from_numpy(vectors))
        figures = entry.get("hnsw_rejected", entry)
        assert set(figures) >= HNSW_FIELDS
        short = figures["recall@1"] < ranking.RECALL_TARGET or figures["speedup"] < ranking.MIN_APPROX_SPEEDUP
        assert (entry["kind"] == "flat") == short == ("hnsw_rejected" in entry)
        assert index_kind(index) == entry["kind"] and index.ntotal == 2000


@pytest.mark.parametrize(
    ("speedup", "kept"), [(5.0, True), (ranking.MIN_APPROX_SPEEDUP, True), (1.99, False)]
)
def test_auto_keeps_hnsw_only_at_the_speedup_it_asks_for(monkeypatch, speedup, kept):
    monkeypatch.setattr(ranking, "APPROX_MIN_CLASSES", 1000)
    monkeypatch.setattr(index_module, "measure_speedup", lambda index, features: speedup)
    index, entry = planned_index(torch.from_numpy(clustered_vocabulary(2000, 32, clusters=20)))
    figures = entry.get("hnsw_rejected", entry)
    assert figures["recall@1"] >= ranking.RECALL_TARGET and figures["speedup"] == speedup
    assert index_kind(index) == entry["kind"] == ("hnsw" if kept else "flat")
    if not kept:
        assert entry == {"kind": "flat", "hnsw_rejected": figures}
        assert f"searched only {speedup:.2f}x as fast, short of 2x" in describe_index(entry)
    else:
        assert f"{speedup:.1f}x as fast as exact search)" in describe_index(entry)


def test_auto_rejects_hnsw_short_of_the_recall_target_and_forced_kinds_keep_their_index(monkeypatch):
    monkeypatch.setattr(ranking, "APPROX_MIN_CLASSES", 1000)
    monkeypatch.setattr(ranking, "EF_SEARCH_MAX", 16)  # too narrow a beam for the target here
    monkeypatch.setattr(index_module, "measure_speedup", lambda index, features: 10.0)
    features = torch.from_numpy(clustered_vocabulary(3000, 32, clusters=30))
    _, entry = planned_index(features)
    rejected = entry["hnsw_rejected"]
    assert entry["kind"] == "flat" and rejected["ef_search"] == 16
    assert rejected["recall@1"] < ranking.RECALL_TARGET
    assert f"HNSW at efSearch 16 reached only recall@1 {rejected['recall@1']:.3f}, short of 0.95" in (
        describe_index(entry)
    )
    # Asked for, HNSW is kept with its measured recall whatever it is; IVF too, its entry as it always was.
    forced, forced_entry = planned_index(features, "hnsw")
    assert index_kind(forced) == "hnsw" and forced_entry == {"kind": "hnsw", **rejected}
    ivf, ivf_entry = planned_index(features, "ivf")
    assert index_kind(ivf) == "ivf"
    assert list(ivf_entry) == ["kind", "nlist", "nprobe", "recall@1", "recall@5", "recall_queries"]


def test_the_speedup_compares_hnsw_with_the_exact_search_rank_uses(monkeypatch):
    calls = []

    def timed(index, queries, k, repeats=3, searcher=None):
        calls.append((searcher, k, len(queries), repeats))
        return 0.5 if searcher is ranking.exact_search else 0.1

    monkeypatch.setattr(index_module, "time_search", timed)
    features = torch.from_numpy(clustered_vocabulary(3000, 32, clusters=30))
    hnsw = build_index(features, plan_index(3000, "hnsw"))
    assert index_module.measure_speedup(hnsw, features) == 5.0
    k = ranking.searched_k(3000, 5)  # a full softmax: every class
    assert calls == [(ranking.search, k, 64, 3), (ranking.exact_search, k, 64, 3)]
    assert index_module.SPEED_BATCH > ranking.SCREEN_MAX_QUERIES  # so rank()'s exact path is unscreened


def test_an_old_manifests_ivf_rejection_is_still_described():
    entry = {"kind": "flat", "ivf_rejected": {"nlist": 316, "nprobe": 256, "recall@1": 0.98}}
    assert describe_index(entry) == (
        "flat (exact search; an IVF index would have needed 256 of its 316 lists per query for the recall "
        "target, no faster than exact)"
    )
    assert describe_index(None) == "flat (exact search)"


def test_an_hnsw_index_stays_on_the_cpu(monkeypatch):
    vectors = clustered_vocabulary(500, 16, clusters=5)
    hnsw = build_index(vectors, plan_index(500, "hnsw"))
    flat = build_index(vectors, plan_index(500, "flat"))
    assert not ranking.fits_gpu(hnsw) and ranking.fits_gpu(flat)
    # With faiss-gpu and a GPU (simulated), a flat index moves; the HNSW one is returned as it is.
    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(
        faiss,
        "index_cpu_to_gpu",
        lambda res, dev, index: moved.append(index) or SimpleNamespace(),
        raising=False,
    )
    assert ranking.index_to_device(hnsw, "cuda") is hnsw and moved == []
    assert ranking.index_to_device(flat, "cuda") is not flat and moved == [flat]


def test_an_hnsw_cache_ranks_through_rank(tmp_path):
    cache = clustered_cache(tmp_path / "c", count=2000)
    result = ranking.rank(load_cache(tmp_path / "c").index, probe_queries(cache.features, 4), 3, 50.0)
    assert result.ids.shape == (4, 3) and (result.ids >= 0).all()
    # Under the full-softmax limit an HNSW search does not reach every class: candidates, honestly.
    assert result.probabilities == "candidates"
