"""Shard writing, URL expansion, streaming and in-memory reading (kdprompt.data.shard_*, kdprompt.data.shards)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdprompt.data.materialize import shards_for
from kdprompt.data.shard_reader import batches_per_epoch_for, make_loader
from kdprompt.data.shard_urls import expand_urls, read_sizes
from kdprompt.data.shard_writer import write_shards
from kdprompt.data.shards import ShardsData, load_shards_split
from kdprompt.data.synthetic import SyntheticData
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError
from kdprompt.folder_lock import folder_lock

CLASSES = ["red square", "green circle", "blue triangle"]


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def image_array(i: int, size: int = 12) -> np.ndarray:
    # smooth gradients (so JPEG stays close) with a per-index colour and a little noise
    rng = np.random.default_rng(i)
    ramp = np.linspace(0, 120, size, dtype=np.float32)
    img = rng.uniform(0, 120, size=3)[None, None, :] + ramp[:, None, None] + ramp[None, :, None] / 2
    return np.clip(img + rng.integers(0, 4, size=(size, size, 3)), 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_split(n: int, *, tmp: Path | None = None, captions: bool = True, name: str = "train") -> Split:
    """``n`` samples with labels i % 3; images as PNG bytes, or PNG files under ``tmp``."""
    samples = []
    for i in range(n):
        data = encode(image_array(i))
        image: str | bytes = data
        if tmp is not None:
            path = tmp / "src" / f"img.{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            image = str(path)
        label = i % 3
        samples.append(
            Sample(
                image=image,
                label=label,
                classname=CLASSES[label],
                caption=f"a photo of a {CLASSES[label]} number {i}" if captions and i % 2 == 0 else None,
                key=f"class {label}/img.{i}.png",
            )
        )
    return Split(samples, list(CLASSES), name=name)


def add_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def collect(loader) -> list[dict]:
    return list(loader)


def all_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ---------------------------------------------------------------------------------------------


def test_round_trip_png_exact_with_labels_captions_classnames(tmp_path):
    split = make_split(7, tmp=tmp_path)
    out = tmp_path / "shards"
    sizes = write_shards(split, out, image_format="png", maxcount=3)
    assert sizes == {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 1}
    assert json.loads((out / "classnames.json").read_text()) == CLASSES
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp left behind

    back = load_shards_split(ShardsData(train=str(out / "train-{000000..000002}.tar")), "train")
    assert back.classnames == CLASSES and back.meta["corrupt"] == 0 and len(back) == 7
    for i, (orig, got) in enumerate(zip(split.samples, back.samples, strict=True)):
        assert got.label == orig.label and got.classname == orig.classname
        assert got.caption == orig.caption
        assert "." not in got.key and got.key.startswith(f"{i:08d}")
        assert isinstance(got.image, bytes)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got.image))), image_array(i))

    batches = collect(
        make_loader(
            str(out / "train-{000000..000002}.tar"), batch_size=2, transform=to_tensor, drop_last=False
        )
    )
    assert sum(len(b["key"]) for b in batches) == 7
    b0 = batches[0]
    assert b0["image"].shape == (2, 3, 12, 12) and b0["image"].dtype == torch.float32
    assert b0["label"].dtype == torch.long and b0["corrupt"] == 0
    assert all(u.endswith(".tar") for b in batches for u in b["url"])
    by_key = {
        k: (lab, txt)
        for b in batches
        for k, lab, txt in zip(b["key"], b["label"].tolist(), b["text"], strict=True)
    }
    for s in back.samples:
        assert by_key[s.key] == (s.label, s.caption or "")


def test_round_trip_jpg_close(tmp_path):
    split = make_split(4, captions=False)
    out = tmp_path / "jpg"
    write_shards(split, out, image_format="jpg", quality=95)
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
    assert any(n.endswith(".jpg") for n in names) and not any(n.endswith(".txt") for n in names)
    back = load_shards_split(ShardsData(test=str(out / "train-000000.tar")), "test")
    for i, s in enumerate(back.samples):
        img = Image.open(io.BytesIO(s.image))
        assert img.format == "JPEG"
        diff = np.abs(np.asarray(img, dtype=np.float32) - image_array(i).astype(np.float32)).mean()
        assert diff < 6
        assert s.caption is None


def test_sizes_json_merged_and_totals(tmp_path):
    out = tmp_path / "s"
    write_shards(make_split(10), out, maxcount=4)
    write_shards(make_split(5, name="val"), out, maxcount=4)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {
        "train-000000.tar": 4,
        "train-000001.tar": 4,
        "train-000002.tar": 2,
        "val-000000.tar": 4,
        "val-000001.tar": 1,
    }
    assert read_sizes(expand_urls(str(out / "train-{000000..000002}.tar"))) == 10
    assert (
        read_sizes(expand_urls([str(out / "train-000000.tar"), str(out / "val-{000000..000001}.tar")])) == 9
    )
    assert read_sizes(["pipe:cat x.tar"]) is None
    # shards sizes.json does not list are counted from their tar headers
    (out / "extra-000000.tar").write_bytes((out / "train-000000.tar").read_bytes())
    (out / "extra-000001.tar").write_bytes(b"")  # unreadable: holds no sample
    assert read_sizes(expand_urls(str(out / "extra-{000000..000001}.tar"))) == 4


def test_overwrite_refused_then_allowed_and_stale_removed(tmp_path):
    out = tmp_path / "o"
    write_shards(make_split(6), out, maxcount=2)
    with pytest.raises(KdpromptError, match=r"train-000000\.tar.*overwrite"):
        write_shards(make_split(6), out, maxcount=2)
    sizes = write_shards(make_split(3), out, maxcount=2, overwrite=True)
    assert (
        sorted(p.name for p in out.glob("train-*.tar"))
        == sorted(sizes)
        == ["train-000000.tar", "train-000001.tar"]
    )
    assert json.loads((out / "sizes.json").read_text()) == sizes


def test_undecodable_image_aborts_cleanly(tmp_path):
    split = make_split(3)
    bad = Sample(image=b"not an image", label=0, classname=CLASSES[0], key="broken/one.jpg")
    split.samples.insert(1, bad)
    out = tmp_path / "bad"
    with pytest.raises(KdpromptError, match=r"broken/one\.jpg"):
        write_shards(split, out)
    assert list(out.iterdir()) == []


def test_expand_urls_missing_names_file_and_remote_pass_through(tmp_path):
    write_shards(make_split(2), tmp_path, maxcount=1)
    with pytest.raises(KdpromptError, match=r"train-000002\.tar.*kdprompt shards SRC OUT"):
        expand_urls(str(tmp_path / "train-{000000..000002}.tar"))
    urls = expand_urls([str(tmp_path / "train-{000000..000001}.tar"), "pipe:curl -s http://x/a-{0..1}.tar"])
    assert urls[2:] == ["pipe:curl -s http://x/a-0.tar", "pipe:curl -s http://x/a-1.tar"]
    assert expand_urls("https://host/d-{00..02}.tar") == [f"https://host/d-{i:02d}.tar" for i in range(3)]


def _shards_with_corrupt(tmp_path: Path) -> str:
    """Two written shards plus a hand-made one holding a garbage .jpg among good samples."""
    out = tmp_path / "c"
    write_shards(make_split(8), out, maxcount=4)
    good = encode(image_array(99), "JPEG")
    members = []
    for key, data in [("g0", good), ("bad", b"\x00garbage\xff" * 10), ("g1", good), ("g2", good)]:
        members += [
            (f"{key}.jpg", data),
            (f"{key}.cls", b"1"),
            (f"{key}.json", b'{"classname": "green circle"}'),
        ]
    add_tar(out / "train-000002.tar", members)
    return str(out / "train-{000000..000002}.tar")


def test_corrupt_member_skipped_and_counted(tmp_path, caplog):
    pattern = _shards_with_corrupt(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kdprompt.data.shards"):
        back = load_shards_split(ShardsData(train=pattern), "train")
    assert len(back) == 11 and back.meta["corrupt"] == 1
    assert "bad" in caplog.text and "train-000002.tar" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdprompt.data.shard_reader"):
        batches = collect(
            make_loader(pattern, batch_size=3, transform=to_tensor, shuffle_buffer=4, drop_last=False)
        )
    assert sum(b["corrupt"] for b in batches) == 1
    assert sum(len(b["key"]) for b in batches) == 11 and "bad" not in all_keys(batches)
    assert "bad" in caplog.text and "train-000002.tar" in caplog.text


def test_corrupt_counted_with_two_workers(tmp_path):
    pattern = _shards_with_corrupt(tmp_path)
    loader = make_loader(pattern, batch_size=2, transform=to_tensor, num_workers=2, drop_last=False, seed=3)
    batches = collect(loader)
    assert sum(b["corrupt"] for b in batches) == 1
    assert sorted(all_keys(batches)) == sorted(set(all_keys(batches))) and len(all_keys(batches)) == 11


def test_img2dataset_layout_reads_as_is(tmp_path):
    members = []
    for i in range(4):
        key = f"{i:09d}"
        meta = {"url": f"http://x/{i}.jpg", "caption": f"cap {i}", "status": "success"}
        if i == 3:
            meta["label"] = 2
        members += [
            (f"{key}.jpg", encode(image_array(i), "JPEG")),
            (f"{key}.txt", f"cap {i}".encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    add_tar(tmp_path / "00000.tar", members)
    batches = collect(
        make_loader(str(tmp_path / "00000.tar"), batch_size=4, transform=to_tensor, shuffle_buffer=0)
    )
    assert len(batches) == 1
    b = batches[0]
    assert b["key"] == [f"{i:09d}" for i in range(4)]
    assert b["label"].tolist() == [-1, -1, -1, 2]
    assert b["text"] == [f"cap {i}" for i in range(4)]


def test_two_ranks_disjoint_and_equal_batch_counts(tmp_path):
    out = tmp_path / "r"
    write_shards(make_split(20), out, maxcount=3)  # 7 shards: ranks get 4 and 3
    pattern = str(out / "train-{000000..000006}.tar")
    urls = expand_urls(pattern)
    seen = []
    for rank in (0, 1):
        batches = collect(make_loader(pattern, batch_size=2, transform=to_tensor, rank=rank, world_size=2))
        seen.append({u for b in batches for u in b["url"]})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(urls)

    n = batches_per_epoch_for(read_sizes(urls), batch_size=2, world_size=2)
    assert n == 5
    counts = []
    for rank in (0, 1):
        loader = make_loader(
            pattern, batch_size=2, transform=to_tensor, rank=rank, world_size=2, batches_per_epoch=n
        )
        counts.append(len(collect(loader)))
    assert counts == [n, n]
    # more batches than a rank holds: its shards repeat, still exactly n
    loader = make_loader(
        pattern, batch_size=4, transform=to_tensor, rank=1, world_size=2, batches_per_epoch=9
    )
    assert len(collect(loader)) == 9


def test_batches_per_epoch_with_workers_and_resampled(tmp_path):
    out = tmp_path / "w"
    write_shards(make_split(12), out, maxcount=3)
    pattern = str(out / "train-{000000..000003}.tar")
    loader = make_loader(pattern, batch_size=2, transform=to_tensor, num_workers=2, batches_per_epoch=7)
    assert len(collect(loader)) == 7
    rs = [
        collect(
            make_loader(
                pattern,
                batch_size=2,
                transform=to_tensor,
                resampled=True,
                batches_per_epoch=5,
                rank=r,
                world_size=8,
            )
        )
        for r in (0, 1)
    ]
    assert [len(b) for b in rs] == [5, 5]
    assert all_keys(rs[0]) != all_keys(rs[1])  # per-rank seeds


def test_deterministic_for_seed_epoch_and_differs_across_epochs(tmp_path):
    out = tmp_path / "d"
    write_shards(make_split(24), out, maxcount=4)
    pattern = str(out / "train-{000000..000005}.tar")

    def run(epoch: int, seed: int = 7) -> list[str]:
        return all_keys(
            collect(make_loader(pattern, batch_size=4, transform=to_tensor, seed=seed, epoch=epoch))
        )

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c and sorted(a) == sorted(c)
    loader = make_loader(pattern, batch_size=4, transform=to_tensor, seed=7, epoch=0)
    assert all_keys(collect(loader)) == a
    loader.set_epoch(1)
    assert all_keys(collect(loader)) == c


def test_fewer_shards_than_readers(tmp_path):
    write_shards(make_split(4), tmp_path, maxcount=2)
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    with pytest.raises(
        KdpromptError, match=r"2 shard\(s\).*2 rank\(s\) x 2 worker\(s\) = 4.*maxcount.*resampled"
    ):
        make_loader(pattern, batch_size=1, transform=to_tensor, rank=0, world_size=2, num_workers=2)
    # resampling does not need a shard per reader
    loader = make_loader(
        pattern,
        batch_size=1,
        transform=to_tensor,
        rank=0,
        world_size=2,
        num_workers=2,
        resampled=True,
        batches_per_epoch=2,
    )
    assert loader.batches_per_epoch == 2


def test_load_split_errors_and_classnames_file(tmp_path):
    write_shards(make_split(3), tmp_path)
    with pytest.raises(KdpromptError, match=r"data\.val"):
        load_shards_split(ShardsData(train=str(tmp_path / "train-000000.tar")), "val")
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    back = load_shards_split(ShardsData(train=str(tmp_path / "train-000000.tar"), classnames=names), "train")
    assert back.classnames == ["a", "b", "c"] and back.samples[1].classname == "b"
    # without classnames.json, names come from the json members
    (tmp_path / "classnames.json").unlink()
    back = load_shards_split(ShardsData(train=str(tmp_path / "train-000000.tar")), "train")
    assert back.classnames == CLASSES


def test_rank_from_environment(tmp_path, monkeypatch):
    write_shards(make_split(8), tmp_path, maxcount=2)
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = {u for b in make_loader(pattern, batch_size=1, transform=to_tensor) for u in b["url"]}
    explicit = make_loader(pattern, batch_size=1, transform=to_tensor, rank=1, world_size=2)
    assert from_env == {u for b in explicit for u in b["url"]} and len(from_env) == 2


def test_batches_per_epoch_for():
    assert batches_per_epoch_for(100, 8, 2) == 6
    assert batches_per_epoch_for(3, 8, 2) == 1


# -- sizes: validated, cross-checked, and found without sizes.json ----------------------------


@pytest.mark.parametrize("bad", [-1, 1e30, "12", [3], None, True, 10**30])
def test_lying_sizes_json_is_named(tmp_path, bad):
    out = tmp_path / "s"
    write_shards(make_split(6), out, maxcount=3)
    (out / "sizes.json").write_text(json.dumps({"train-000000.tar": bad, "train-000001.tar": 3}))
    with pytest.raises(KdpromptError, match=r"sizes\.json.*train-000000\.tar") as err:
        read_sizes(expand_urls(str(out / "train-{000000..000001}.tar")))
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "named"), [("[3, 3]", "holds a list"), ("{", "cannot read"), ('"six"', "holds a str")]
)
def test_sizes_json_that_is_not_a_mapping_is_named(tmp_path, text, named):
    out = tmp_path / "s"
    write_shards(make_split(6), out, maxcount=3)
    (out / "sizes.json").write_text(text)
    with pytest.raises(KdpromptError, match=named) as err:
        read_sizes(expand_urls(str(out / "train-000000.tar")))
    assert "sizes.json" in str(err.value)


@pytest.mark.parametrize("listed", [0, 2, 4])
def test_sizes_json_disagreeing_with_its_shard_is_named(tmp_path, listed):
    out = tmp_path / "s"
    write_shards(make_split(6), out, maxcount=3)
    (out / "sizes.json").write_text(json.dumps({"train-000000.tar": listed, "train-000001.tar": 3}))
    with pytest.raises(KdpromptError, match=rf"sizes\.json: shard train-000000\.tar .* {listed} .* holds 3"):
        read_sizes(expand_urls(str(out / "train-{000000..000001}.tar")))


def img2dataset_shard(path: Path, first: int, n: int, extra_files: bool = False) -> None:
    """A tar laid out as img2dataset writes one: <key>.jpg, <key>.txt, <key>.json per sample."""
    members = []
    for i in range(first, first + n):
        key = f"{i:09d}"
        members += [
            (f"{key}.jpg", encode(image_array(i), "JPEG")),
            (f"{key}.txt", f"caption {i}".encode()),
            (f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg", "status": "success"}).encode()),
        ]
    if extra_files:
        members.append(("__meta__", b"not a sample"))  # skipped by webdataset, so not counted
    add_tar(path, members)


def test_img2dataset_output_is_sized_from_its_stats_files(tmp_path):
    # img2dataset writes NNNNN.tar, NNNNN.parquet and NNNNN_stats.json per shard, and no sizes.json.
    for shard, n in ((0, 3), (1, 2)):
        img2dataset_shard(tmp_path / f"{shard:05d}.tar", shard * 10, n)
        stats = {"count": n + 1, "successes": n, "failed_to_download": 1, "failed_to_resize": 0}
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    urls = expand_urls(str(tmp_path / "{00000..00001}.tar"))
    assert read_sizes(urls) == 5
    batches = collect(make_loader(urls, batch_size=5, transform=to_tensor, drop_last=False))
    assert sum(len(b["key"]) for b in batches) == 5

    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": 3, "successes": "2"}))
    with pytest.raises(KdpromptError, match=r"00001_stats\.json: shard 00001\.tar has '2' successes"):
        read_sizes(urls)
    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": 3, "successes": 7}))
    with pytest.raises(
        KdpromptError, match=r"00001_stats\.json: shard 00001\.tar is listed with 7 .* holds 2"
    ):
        read_sizes(urls)


def test_bare_tars_are_counted_from_their_headers(tmp_path):
    img2dataset_shard(tmp_path / "a-0.tar", 0, 4, extra_files=True)
    img2dataset_shard(tmp_path / "a-1.tar", 10, 3)
    assert read_sizes(expand_urls(str(tmp_path / "a-{0..1}.tar"))) == 7


# -- a shard cut short ------------------------------------------------------------------------


def cut_shard(out: Path, *, member: int, offset: int) -> Path:
    """Shard train-000000.tar of 6 captioned samples (cls, json, png, txt each), cut in or at ``member``."""
    split = make_split(6, captions=False)
    split.samples[:] = [dataclasses.replace(s, caption=f"caption of {s.key}") for s in split.samples]
    write_shards(split, out, image_format="png", maxcount=6)
    path = out / "train-000000.tar"
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    path.write_bytes(path.read_bytes()[: (info.offset if offset < 0 else info.offset_data + offset)])
    return path


@pytest.mark.parametrize(
    ("member", "offset"),
    [
        (8, 1),  # in the first member (cls) of the third sample
        (11, 3),  # in its caption, its last member: it passed as whole, without its caption
        (10, -1),  # between two of its members (before its png): no read error at all
        (12, -1),  # between it and the fourth: the rest was lost uncounted (the third is kept out too:
        # nothing tells a whole last sample from one cut between its members)
    ],
)
def test_sample_a_cut_shard_ends_in_is_counted_as_corrupt(tmp_path, member, offset, caplog):
    path = cut_shard(tmp_path / "cut", member=member, offset=offset)
    with caplog.at_level(logging.WARNING):
        back = load_shards_split(ShardsData(train=str(path)), "train")
    assert len(back) == 2 and back.meta["corrupt"] == 1
    assert "cut short" in caplog.text and "00000002" in caplog.text

    # streamed beside a whole shard, so the cut sample is not the last one read
    write_shards(make_split(6, name="good"), tmp_path / "cut", maxcount=6)
    urls = [str(path), str(tmp_path / "cut" / "good-000000.tar")]
    batches = collect(
        make_loader(urls, batch_size=2, transform=to_tensor, shuffle_buffer=0, interleave=2, drop_last=False)
    )
    assert sum(len(b["key"]) for b in batches) == 8 and sum(b["corrupt"] for b in batches) == 1


def test_gzipped_shard_whole_and_cut(tmp_path):
    write_shards(make_split(5), tmp_path, maxcount=5)
    packed = gzip.compress((tmp_path / "train-000000.tar").read_bytes())
    (tmp_path / "whole.tar.gz").write_bytes(packed)
    (tmp_path / "cut.tar.gz").write_bytes(packed[: len(packed) * 2 // 3])
    whole = load_shards_split(ShardsData(train=str(tmp_path / "whole.tar.gz")), "train")
    assert len(whole) == 5 and whole.meta["corrupt"] == 0
    cut = load_shards_split(ShardsData(train=str(tmp_path / "cut.tar.gz")), "train")
    assert len(cut) + cut.meta["corrupt"] < 5 and cut.meta["corrupt"] == 1
    assert read_sizes([str(tmp_path / "whole.tar.gz")]) == 5


def test_whole_shards_have_no_corrupt_samples(tmp_path):
    write_shards(make_split(5), tmp_path, maxcount=5)
    back = load_shards_split(ShardsData(train=str(tmp_path / "train-000000.tar")), "train")
    assert len(back) == 5 and back.meta["corrupt"] == 0


# -- one-line errors ----------------------------------------------------------------------------


def test_unbalanced_braces_are_named(tmp_path):
    with pytest.raises(KdpromptError, match=r"'shards/\{000\.\.009\.tar' has unbalanced braces"):
        expand_urls("shards/{000..009.tar")
    with pytest.raises(KdpromptError, match="unbalanced braces"):
        make_loader("shards/000..009}.tar", batch_size=1, transform=to_tensor)


def test_loader_worker_error_is_one_line(tmp_path):
    bad = tmp_path / "bad-000000.tar"
    bad.write_bytes(b"not a tar" * 100)
    loader = make_loader(str(bad), batch_size=1, transform=to_tensor, num_workers=1, batches_per_epoch=1)
    with pytest.raises(KdpromptError) as err:
        collect(loader)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert "hold no readable samples" in message and "bad-000000.tar" in message


# -- materialised shards: written whole, repaired, temporaries of killed writes removed -----------


def small_world(root: str) -> SyntheticData:
    return SyntheticData(root=root, image_size=32, train_per_class=1, val_per_class=1, test_per_class=1)


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_materialised_folder_without_sizes_json_is_rebuilt(tmp_path, world_root):
    urls = shards_for(small_world(world_root), "train", tmp_path, maxcount=16)
    folder = Path(urls[0]).parent
    assert len(urls) == 3 and not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    reference = files_of(folder)
    # What a writer of an older version left when killed: some shards, no sizes.json.
    (folder / "sizes.json").unlink()
    Path(urls[-1]).unlink()
    assert shards_for(small_world(world_root), "train", tmp_path, maxcount=16) == urls
    assert files_of(folder) == reference


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path, world_root):
    urls = shards_for(small_world(world_root), "train", tmp_path, maxcount=16)
    name = Path(urls[0]).parent.name
    own = tmp_path / f".{name}.k1ll3d_0.tmp"
    (own / name).mkdir(parents=True)
    (own / name / "train-000000.tar").write_bytes(b"half a shard")
    abandoned = tmp_path / ".synthetic-train-0123456789abcdef.x9y8z7w6.tmp"  # a recipe since changed
    busy = tmp_path / ".synthetic-train-fedcba9876543210.b0sy_000.tmp"  # a live writer's
    foreign = [tmp_path / ".notes.tmp", tmp_path / "synthetic-train-0123456789abcdef.x9y8z7w6.tmp"]
    for path in (abandoned, busy, *foreign):
        path.mkdir()
    with folder_lock(tmp_path / "synthetic-train-fedcba9876543210"):
        assert shards_for(small_world(world_root), "train", tmp_path, maxcount=16) == urls
    assert not own.exists() and not abandoned.exists()
    assert busy.exists() and all(p.exists() for p in foreign)


def test_write_shards_removes_a_killed_writes_temporaries(tmp_path):
    out = tmp_path / "s"
    write_shards(make_split(4), out, maxcount=2)
    stale = [out / ".val-shards.abcd_123.tmp", out / ".sizes.json.zz00yy11.tmp"]
    for path in stale:
        path.mkdir()
    (stale[0] / "val-000000.tar").write_bytes(b"half a shard")
    write_shards(make_split(3, name="val"), out, maxcount=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "classnames.json",
        "sizes.json",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
