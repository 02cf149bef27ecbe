"""Shard writing, URL expansion, streaming and in-memory reading (kdprompt.data.shard_*, kdprompt.data.shards)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdprompt.data.shard_reader import batches_per_epoch_for, make_loader
from kdprompt.data.shard_urls import expand_urls, read_sizes
from kdprompt.data.shard_writer import write_shards
from kdprompt.data.shards import ShardsData, load_shards_split
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError

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
    (out / "extra-000000.tar").write_bytes(b"")
    assert read_sizes([str(out / "extra-000000.tar")]) is None


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
