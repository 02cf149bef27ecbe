"""The cache's index as its manifest records it: measured recall, refusals, copies, old caches."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdprompt.errors import KdpromptError
from kdprompt.text_features import FEATURES_FILE, INDEX_FILE, MANIFEST_FILE, build_cache, load_cache, ranking
from kdprompt.text_features.index import index_kind
from kdprompt.text_features.ranking import IndexPlan, build_index, probe_queries, rank
from kdprompt.text_features.store import copy_cache

FP = "a" * 64


def random_cache(path: Path, count: int, dim: int = 32, index: str = "auto", seed: int = 0):
    features = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    names = [f"class {i:05d}" for i in range(count)]
    return build_cache(features, names, path, teacher_fingerprint=FP, logit_scale=50.0, index=index)


def edit_manifest(path: Path, edit) -> None:
    """Apply ``edit`` to both copies of the cache manifest (the JSON file and the features' metadata)."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with safe_open(str(path / FEATURES_FILE), framework="pt") as f:
        tensor = f.get_tensor("text_features")
    save_file(
        {"text_features": tensor}, str(path / FEATURES_FILE), metadata={"manifest": json.dumps(manifest)}
    )


def test_an_ivf_cache_records_its_measured_recall_and_loads_with_its_nprobe(tmp_path):
    built = random_cache(tmp_path / "c", 3000, index="ivf")
    entry = built.manifest["index"]
    assert entry["kind"] == "ivf" and entry["nlist"] == 76  # min(4 sqrt(3000), 3000 // 39)
    assert 1 <= entry["nprobe"] <= entry["nlist"]
    assert 0 <= entry["recall@5"] <= 1 and entry["recall_queries"] == ranking.RECALL_QUERIES
    assert entry["recall@1"] >= ranking.RECALL_TARGET or entry["nprobe"] == entry["nlist"]
    with safe_open(str(tmp_path / "c" / FEATURES_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["manifest"])["index"] == entry  # under the integrity check

    # The file's own nprobe is not trusted: the manifest's is set when the cache is read.
    index = faiss.read_index(str(tmp_path / "c" / INDEX_FILE))
    faiss.extract_index_ivf(index).nprobe = 1
    faiss.write_index(index, str(tmp_path / "c" / INDEX_FILE))
    cache = load_cache(tmp_path / "c")
    assert index_kind(cache.index) == "ivf"
    assert faiss.extract_index_ivf(cache.index).nprobe == entry["nprobe"]

    # Its search finds what exact search finds, at the recorded recall.
    queries = probe_queries(cache.features, 200, seed=5)
    _, found = cache.search(queries, 1)
    truth = (queries @ cache.features.numpy().T).argmax(1)
    assert abs((found[:, 0] == truth).mean() - entry["recall@1"]) < 0.1


def test_an_edited_index_entry_is_refused(tmp_path):
    random_cache(tmp_path / "c", 3000, index="ivf")
    file = tmp_path / "c" / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    manifest["index"]["recall@1"] = 1.0  # a better figure than measured, in the JSON file only
    file.write_text(json.dumps(manifest))
    with pytest.raises(KdpromptError, match=r"disagrees with the manifest inside .*fields: index\)"):
        load_cache(tmp_path / "c")
    # Edited in both copies consistently but impossible (more probes than lists): malformed.
    edit_manifest(tmp_path / "c", lambda m: m["index"].update(nprobe=m["index"]["nlist"] + 1))
    with pytest.raises(KdpromptError, match=r"malformed fields .*index"):
        load_cache(tmp_path / "c")


def test_an_hnsw_entry_without_a_search_breadth_is_malformed(tmp_path):
    random_cache(tmp_path / "c", 500, index="hnsw")
    edit_manifest(tmp_path / "c", lambda m: m["index"].update(ef_search=0))
    with pytest.raises(KdpromptError, match=r"malformed fields .*index"):
        load_cache(tmp_path / "c")


@pytest.mark.parametrize(
    ("kind", "other"), [("flat", "ivf"), ("ivf", "flat"), ("flat", "hnsw"), ("hnsw", "flat"), ("ivf", "hnsw")]
)
def test_an_index_of_another_kind_than_the_manifest_is_refused(tmp_path, kind, other):
    cache = random_cache(tmp_path / "c", 3000, index=kind)
    plan = ranking.plan_index(3000, other)
    faiss.write_index(build_index(cache.features, plan), str(tmp_path / "c" / INDEX_FILE))
    with pytest.raises(KdpromptError) as err:
        load_cache(tmp_path / "c")
    message = str(err.value)
    assert f"index of kind {other!r} but the cache manifest records kind {kind!r}" in message
    assert "kdprompt cache" in message


def test_a_stale_ivf_index_is_refused(tmp_path):
    cache = random_cache(tmp_path / "c", 3000, index="ivf")
    nlist = cache.manifest["index"]["nlist"]
    other = torch.nn.functional.normalize(torch.randn(3000, 32), dim=-1)
    faiss.write_index(build_index(other, IndexPlan("ivf", nlist, 1)), str(tmp_path / "c" / INDEX_FILE))
    with pytest.raises(KdpromptError, match="does not hold this cache's features: the index is stale"):
        load_cache(tmp_path / "c")
    faiss.write_index(build_index(other, IndexPlan("ivf", nlist - 1, 1)), str(tmp_path / "c" / INDEX_FILE))
    with pytest.raises(KdpromptError, match=f"has {nlist - 1} inverted lists but the cache manifest says"):
        load_cache(tmp_path / "c")


def test_a_cache_without_an_index_entry_has_a_flat_index(tmp_path):
    random_cache(tmp_path / "c", 20)
    edit_manifest(tmp_path / "c", lambda m: m.pop("index"))  # as kdprompt wrote caches before
    cache = load_cache(tmp_path / "c")
    assert "index" not in cache.manifest and index_kind(cache.index) == "flat"
    # ...and a copy with auto keeps it as it is (flat below the threshold), byte for byte.
    copy_cache(cache, tmp_path / "copy")
    for name in (FEATURES_FILE, INDEX_FILE, MANIFEST_FILE):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_copy_cache_rebuilds_the_index_only_when_another_kind_is_asked(tmp_path):
    source = random_cache(tmp_path / "c", 3000, index="ivf")
    kept = copy_cache(load_cache(tmp_path / "c"), tmp_path / "auto")  # auto keeps the ivf index
    assert kept.manifest == source.manifest
    assert (tmp_path / "auto" / INDEX_FILE).read_bytes() == (tmp_path / "c" / INDEX_FILE).read_bytes()
    flat = copy_cache(load_cache(tmp_path / "c"), tmp_path / "flat", "flat")
    assert flat.manifest["index"] == {"kind": "flat"}
    reloaded = load_cache(tmp_path / "flat")
    assert index_kind(reloaded.index) == "flat"
    assert {k: v for k, v in reloaded.manifest.items() if k != "index"} == {
        k: v for k, v in source.manifest.items() if k != "index"
    }  # same features, hashes, names: only the index changed
    back = copy_cache(reloaded, tmp_path / "ivf", "ivf")
    assert back.manifest["index"]["kind"] == "ivf" and index_kind(load_cache(tmp_path / "ivf").index) == "ivf"


def test_copy_cache_keeps_half_precision_features_bit_for_bit(tmp_path):
    features = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    names = [f"c{i}" for i in range(10)]
    source = build_cache(
        features, names, tmp_path / "c", teacher_fingerprint=FP, logit_scale=50.0, dtype=torch.float16
    )
    copy_cache(load_cache(tmp_path / "c"), tmp_path / "ivf", "ivf")
    assert load_cache(tmp_path / "ivf").manifest["features_sha256"] == source.manifest["features_sha256"]


def test_a_subset_of_an_ivf_cache_searches_exactly(tmp_path):
    cache = load_cache(random_cache(tmp_path / "c", 3000, index="ivf").path)
    subset = cache.subset(cache.classnames[:10])
    assert subset.manifest["index"] == {"kind": "flat"} and index_kind(subset.index) == "flat"


def test_an_unknown_index_kind_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(KdpromptError, match="unknown index kind 'annoy'"):
        random_cache(tmp_path / "c", 5, index="annoy")
    assert not (tmp_path / "c").exists()


def test_an_ivf_index_that_misses_classes_says_its_softmax_covers_only_the_candidates():
    vectors = torch.nn.functional.normalize(torch.randn(2000, 16, generator=torch.Generator().manual_seed(0)))
    index = build_index(vectors, IndexPlan("ivf", nlist=40, nprobe=1))
    queries = probe_queries(vectors, 8, seed=2)
    result = rank(index, queries, k=5, logit_scale=50.0)
    # 2000 classes is under the full-softmax limit, but one probed list of 40 does not score them all.
    assert result.probabilities == "candidates"
    assert (result.probs <= 1).all() and (result.ids[:, 0] >= 0).all()
    exhaustive = build_index(vectors, IndexPlan("ivf", nlist=40, nprobe=40))
    assert rank(exhaustive, queries, k=5, logit_scale=50.0).probabilities == "full"


def test_indexes_a_gpu_could_not_rank_stay_on_the_cpu(monkeypatch):
    small = build_index(np.eye(8, dtype=np.float32), IndexPlan("flat"))
    assert ranking.fits_gpu(small)  # a full softmax over 8 classes: within the GPU's k
    monkeypatch.setattr(ranking, "GPU_MAX_K", 4)
    assert not ranking.fits_gpu(small)  # every class would be searched: more than the GPU returns
    monkeypatch.setattr(ranking, "FULL_SOFTMAX_MAX_CLASSES", 4)
    monkeypatch.setattr(ranking, "CANDIDATES", 3)
    assert ranking.fits_gpu(small)  # past the full-softmax limit only the candidates are searched
    ivf = build_index(probe_queries(np.eye(8, dtype=np.float32), 400), IndexPlan("ivf", nlist=5, nprobe=5))
    # (400 vectors: past the full-softmax limit, 3 candidates) but 5 probes, more than a GPU allows
    assert not ranking.fits_gpu(ivf)
    assert ranking.index_to_device(small, "cpu") is small
