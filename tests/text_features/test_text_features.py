"""The text-feature cache: round trip, refusals, FAISS vs torch, subsets, atomic replace, class files."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kdprompt
from kdprompt.errors import KdpromptError
from kdprompt.text_features import (
    FEATURES_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    TextCache,
    build_cache,
    classnames_sha256,
    load_cache,
    read_classnames_file,
)

FP = "a" * 64
OTHER_FP = "b" * 64


def names_of(count: int) -> list[str]:
    return [f"class {i:03d}" for i in range(count)]


def make(tmp_path: Path, count: int = 50, dim: int = 64, **kwargs) -> tuple[torch.Tensor, TextCache]:
    features = torch.randn(count, dim, generator=torch.Generator().manual_seed(0)) * 3
    kwargs = {"teacher_fingerprint": FP, "logit_scale": 100.0, **kwargs}
    return features, build_cache(features, names_of(count), tmp_path / "cache", **kwargs)


def test_round_trip(tmp_path):
    features, built = make(tmp_path, provenance={"teacher": "runs/x/teacher", "method": "promptsrc"})
    path = tmp_path / "cache"
    assert sorted(p.name for p in path.iterdir()) == sorted([FEATURES_FILE, INDEX_FILE, MANIFEST_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    cache = load_cache(path, expect_fingerprint=FP, expect_classnames=names_of(50))
    expected = F.normalize(features, dim=-1)
    torch.testing.assert_close(cache.features, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(built.features, cache.features, rtol=0, atol=0)
    assert cache.features.dtype == torch.float32
    assert cache.classnames == names_of(50)
    assert (cache.teacher_fingerprint, cache.logit_scale, cache.embed_dim) == (FP, 100.0, 64)

    m = cache.manifest
    assert m["format_version"] == 1 and m["kind"] == "kdprompt-text-cache"
    assert m["classnames_sha256"] == classnames_sha256(names_of(50))
    assert (m["num_classes"], m["embed_dim"], m["dtype"]) == (50, 64, "float32")
    assert m["created_by"] == kdprompt.__version__
    assert m["provenance"] == {"teacher": "runs/x/teacher", "method": "promptsrc"}
    assert m == built.manifest
    on_disk = json.loads((path / MANIFEST_FILE).read_text())
    with safe_open(str(path / FEATURES_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["manifest"]) == on_disk == m
    assert cache.index.ntotal == 50


def test_classnames_sha256_is_of_newline_joined_utf8():
    import hashlib

    assert classnames_sha256(["a", "é"]) == hashlib.sha256("a\né".encode()).hexdigest()


def test_half_precision_storage(tmp_path):
    features, _ = make(tmp_path, count=5, dim=8, dtype=torch.float16)
    stored = load_file(str(tmp_path / "cache" / FEATURES_FILE))["text_features"]
    assert stored.dtype == torch.float16
    cache = load_cache(tmp_path / "cache")
    assert cache.features.dtype == torch.float32 and cache.manifest["dtype"] == "float16"
    torch.testing.assert_close(cache.features, F.normalize(features, dim=-1), rtol=0, atol=1e-3)


def test_refuses_another_teacher(tmp_path):
    make(tmp_path)
    with pytest.raises(KdpromptError) as err:
        load_cache(tmp_path / "cache", expect_fingerprint=OTHER_FP)
    message = str(err.value)
    assert FP in message and OTHER_FP in message
    assert "another teacher" in message and "kdprompt cache" in message


def test_refuses_another_class_list(tmp_path):
    make(tmp_path, count=6)
    names = names_of(6)
    with pytest.raises(KdpromptError) as err:
        load_cache(tmp_path / "cache", expect_classnames=[*names[:5], "zebra"])
    assert "'zebra'" in str(err.value) and "'class 005'" in str(err.value)

    with pytest.raises(KdpromptError) as err:
        load_cache(tmp_path / "cache", expect_classnames=[names[1], names[0], *names[2:]])
    assert "order" in str(err.value) and "'class 000'" in str(err.value) and "'class 001'" in str(err.value)


def test_refuses_tampered_features(tmp_path):
    make(tmp_path, count=4, dim=8)
    file = tmp_path / "cache" / FEATURES_FILE
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
        tensor = f.get_tensor("text_features")
    tensor[0, 0] += 0.01
    save_file({"text_features": tensor}, str(file), metadata=metadata)
    with pytest.raises(KdpromptError, match="features_sha256"):
        load_cache(tmp_path / "cache")


def test_refuses_edited_manifest(tmp_path):
    make(tmp_path, count=4, dim=8)
    file = tmp_path / "cache" / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    manifest["teacher_fingerprint"] = OTHER_FP
    file.write_text(json.dumps(manifest))
    with pytest.raises(KdpromptError, match="teacher_fingerprint"):
        load_cache(tmp_path / "cache")


def test_missing_index_is_named(tmp_path):
    make(tmp_path, count=4, dim=8)
    (tmp_path / "cache" / INDEX_FILE).unlink()
    with pytest.raises(KdpromptError) as err:
        load_cache(tmp_path / "cache")
    assert INDEX_FILE in str(err.value) and "kdprompt cache" in str(err.value)
    with pytest.raises(KdpromptError, match="no text-feature cache"):
        load_cache(tmp_path / "nowhere")


def test_stale_index_is_refused(tmp_path):
    make(tmp_path, count=4, dim=8)
    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype=np.float32)[:3])
    faiss.write_index(index, str(tmp_path / "cache" / INDEX_FILE))
    with pytest.raises(KdpromptError, match="stale"):
        load_cache(tmp_path / "cache")
    # Training keeps no index in memory, but a stale one is still refused when the cache is opened.
    with pytest.raises(KdpromptError, match="stale"):
        load_cache(tmp_path / "cache", load_index=False)


@pytest.mark.parametrize("garbage", [b"", b"not an index\n", bytes(range(256)) * 2])
def test_garbage_index_is_refused_when_the_cache_is_opened(tmp_path, garbage):
    # What distill opens (load_index=False): a garbage index used to pass and only fail at export.
    make(tmp_path, count=4, dim=8)
    (tmp_path / "cache" / INDEX_FILE).write_bytes(garbage)
    with pytest.raises(KdpromptError) as err:
        load_cache(tmp_path / "cache", load_index=False)
    message = str(err.value)
    assert f"{INDEX_FILE} is not a readable FAISS index" in message and "kdprompt cache" in message


def test_lazy_index_is_dropped_then_read_again(tmp_path):
    make(tmp_path, count=4, dim=8)
    lazy = load_cache(tmp_path / "cache", load_index=False)
    assert lazy._index is None and lazy.index.ntotal == 4


def test_faiss_search_matches_torch(tmp_path):
    make(tmp_path)
    cache = load_cache(tmp_path / "cache")
    queries = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    logits = cache.logits(queries)
    assert logits.shape == (200, 50)

    scores, indices = cache.search(queries, k=1)
    assert indices.shape == (200, 1) and indices.dtype == np.int64
    np.testing.assert_array_equal(indices[:, 0], logits.argmax(dim=1).numpy())

    scores, indices = cache.search(queries.numpy(), k=5)
    top = torch.topk(logits, 5, dim=1)
    np.testing.assert_array_equal(indices, top.indices.numpy())
    np.testing.assert_allclose(scores * cache.logit_scale, top.values.numpy(), rtol=0, atol=1e-3)

    one = queries[0].numpy()
    before = one.copy()
    _, single = cache.search(one, k=100)
    assert single.shape == (1, 50)  # k is capped at C
    np.testing.assert_array_equal(one, before)  # the caller's array is not normalised in place


def test_logits_are_differentiable_and_dim_checked(tmp_path):
    _, cache = make(tmp_path, count=5, dim=8)
    x = torch.randn(3, 8, requires_grad=True)
    cache.logits(x).sum().backward()
    assert x.grad is not None
    with pytest.raises(KdpromptError, match="embed_dim 8"):
        cache.logits(torch.randn(3, 7))


def test_subset_order(tmp_path):
    make(tmp_path, count=10, dim=8)
    cache = load_cache(tmp_path / "cache")
    names = ["class 007", "class 002", "class 009"]
    sub = cache.subset(names)
    assert sub.classnames == names and sub.path is None
    torch.testing.assert_close(sub.features, cache.features[[7, 2, 9]], rtol=0, atol=0)
    assert sub.manifest["num_classes"] == 3 and sub.manifest["classnames_sha256"] == classnames_sha256(names)
    assert sub.teacher_fingerprint == FP
    _, indices = sub.search(sub.features, k=1)
    np.testing.assert_array_equal(indices[:, 0], [0, 1, 2])
    with pytest.raises(KdpromptError) as err:
        cache.subset(["class 001", "unicorn", "dragon"])
    assert "'unicorn'" in str(err.value) and "'dragon'" in str(err.value)


def test_atomic_replace_keeps_old_cache_on_failure(tmp_path, monkeypatch):
    make(tmp_path, count=4, dim=8)
    old = load_cache(tmp_path / "cache")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_cache(
            torch.randn(6, 8), names_of(6), tmp_path / "cache", teacher_fingerprint=OTHER_FP, logit_scale=50.0
        )
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temp dirs left beside it
    survived = load_cache(tmp_path / "cache", expect_fingerprint=FP)
    torch.testing.assert_close(survived.features, old.features, rtol=0, atol=0)

    monkeypatch.undo()
    build_cache(
        torch.randn(6, 8), names_of(6), tmp_path / "cache", teacher_fingerprint=OTHER_FP, logit_scale=50.0
    )
    assert load_cache(tmp_path / "cache", expect_fingerprint=OTHER_FP).manifest["num_classes"] == 6
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_build_refuses_bad_input(tmp_path):
    ok = {"teacher_fingerprint": FP, "logit_scale": 100.0}
    with pytest.raises(KdpromptError, match="3 rows but 2 class names"):
        build_cache(torch.randn(3, 4), ["a", "b"], tmp_path / "c", **ok)
    with pytest.raises(KdpromptError, match="'a'"):
        build_cache(torch.randn(3, 4), ["a", "b", "a"], tmp_path / "c", **ok)
    bad = torch.randn(2, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(KdpromptError, match=r"not finite.*'b'"):
        build_cache(bad, ["a", "b"], tmp_path / "c", **ok)
    not_a_cache = tmp_path / "precious"
    not_a_cache.mkdir()
    (not_a_cache / "thesis.tex").write_text("years of work")
    with pytest.raises(KdpromptError, match="not a cache"):
        build_cache(torch.randn(2, 4), ["a", "b"], not_a_cache, **ok)
    assert (not_a_cache / "thesis.tex").is_file()
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "manifest", [{}, {"format": "kdprompt-student-bundle", "format_version": 1}, {"kind": "something-else"}]
)
def test_build_replaces_only_a_cache_whatever_holds_a_manifest(tmp_path, manifest):
    # A folder with a manifest.json is not a cache: a bundle, or anyone's project, is never replaced.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(KdpromptError, match=r"folder.*not a cache.*kdprompt-text-cache"):
        build_cache(torch.randn(2, 4), ["a", "b"], folder, teacher_fingerprint=FP, logit_scale=100.0)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_FILE, "thesis.tex"]


def test_build_replaces_a_cache_only_with_overwrite(tmp_path):
    make(tmp_path, count=4, dim=8)
    with pytest.raises(KdpromptError, match=r"already holds a text-feature cache.*--overwrite"):
        make(tmp_path, count=5, dim=8, overwrite=False)
    assert load_cache(tmp_path / "cache").num_classes == 4
    make(tmp_path, count=5, dim=8, overwrite=True)
    assert load_cache(tmp_path / "cache").num_classes == 5
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    build_cache(
        torch.randn(2, 4),
        ["a", "b"],
        tmp_path / "empty",
        teacher_fingerprint=FP,
        logit_scale=1.0,
        overwrite=False,
    )
    assert load_cache(tmp_path / "empty").num_classes == 2


def test_load_puts_back_a_cache_left_aside_by_a_killed_swap(tmp_path):
    # A rebuild killed between the two renames of its directory swap: only .cache.old is left.
    make(tmp_path, count=4, dim=8)
    (tmp_path / "cache").rename(tmp_path / ".cache.old")
    cache = load_cache(tmp_path / "cache")
    assert cache.num_classes == 4 and [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_read_classnames_text_and_json(tmp_path):
    text = tmp_path / "classes.txt"
    text.write_text("# my classes\nred triangle\n\n  blue square  \r\n# done\ngreen circle\n")
    assert read_classnames_file(text) == ["red triangle", "blue square", "green circle"]

    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(["a", "b"]))
    assert read_classnames_file(as_list) == ["a", "b"]

    as_object = tmp_path / "names"
    as_object.write_text(json.dumps({"classnames": ["x", "y", "z"]}))
    assert read_classnames_file(as_object) == ["x", "y", "z"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "# only a comment\n\n", "no class names"),
        ("dupes.txt", "a\nb\na\n", "repeat 'a'"),
        ("broken.json", '["a", "b",]', "not valid JSON"),
        ("numbers.json", "[1, 2]", "list of strings"),
        ("dupes.json", '["a", "a"]', "repeat 'a'"),
    ],
)
def test_read_classnames_errors_name_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(KdpromptError, match=match) as err:
        read_classnames_file(path)
    assert str(path) in str(err.value)


def test_prompts_are_recorded_optional_and_checked(tmp_path):
    prompts = [f"a photo of a {n}." for n in names_of(4)]
    make(tmp_path, count=4, dim=8, prompts=prompts)
    cache = load_cache(tmp_path / "cache")
    assert cache.manifest["prompts"] == prompts
    assert cache.subset(["class 003", "class 000"]).manifest["prompts"] == [prompts[3], prompts[0]]
    # Caches written before the field existed have none, and still load.
    make(tmp_path / "old", count=4, dim=8)
    assert "prompts" not in load_cache(tmp_path / "old" / "cache").manifest
    assert "prompts" not in load_cache(tmp_path / "old" / "cache").subset(["class 001"]).manifest
    with pytest.raises(KdpromptError, match="3 prompts were given for 4 class names"):
        make(tmp_path / "bad", count=4, dim=8, prompts=prompts[:3])
    file = tmp_path / "cache" / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    manifest["prompts"] = prompts[:3]
    file.write_text(json.dumps(manifest))
    with pytest.raises(KdpromptError, match="malformed fields"):
        load_cache(tmp_path / "cache")
