"""`kdprompt shards` through the CLI, and pre-training from the shards it writes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from kdprompt.data.shards import ShardsData, load_shards_split


def make_folder(root, classes=("cat", "red_car"), per_class=3):
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 12), (40 * i, 90, 200)).save(root / split / c / f"{i}.png")


def test_shards_from_a_folder_round_trip(cli, tmp_path):
    make_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    result = cli(
        "shards",
        tmp_path / "photos",
        out,
        "--split",
        "train",
        "--split",
        "test",
        "--format",
        "png",
        "--maxcount",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert "train: 6 samples in 2 shard(s)" in result.output
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(v for k, v in sizes.items() if k.startswith("test-")) == 6
    split = load_shards_split(ShardsData(test=str(out / "test-{000000..000001}.tar")), "test")
    assert split.classnames == ["cat", "red car"]
    assert sorted(s.label for s in split.samples) == [0, 0, 0, 1, 1, 1]


def test_shards_refuses_to_overwrite(cli, tmp_path):
    make_folder(tmp_path / "photos")
    assert cli("shards", tmp_path / "photos", tmp_path / "s").exit_code == 0
    again = cli("shards", tmp_path / "photos", tmp_path / "s")
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert cli("shards", tmp_path / "photos", tmp_path / "s", "--overwrite").exit_code == 0


def test_shards_from_a_source_name_with_overrides(cli, tmp_path, world_root):
    out = tmp_path / "syn"
    result = cli(
        "shards",
        "synthetic",
        out,
        f"root={world_root}",
        "domain=pretrain",
        "train_per_class=4",
        "test_per_class=2",
        "val_per_class=1",
    )
    assert result.exit_code == 0, result.output
    split = load_shards_split(ShardsData(train=str(out / "train-000000.tar")), "train")
    assert len(split) == 4 * len(split.classnames)
    assert all(s.caption and s.classname in s.caption for s in split.samples)


def test_shards_bad_source_field_is_named(cli, tmp_path):
    result = cli("shards", "coop", tmp_path / "x", "root=/nowhere", "dataset=imagenet1k")
    assert result.exit_code == 2
    assert "data.dataset" in result.output and "imagenet1k" in result.output and "caltech101" in result.output


@pytest.mark.slow
def test_pretrain_reads_user_shards(cli, tmp_path, world_root):
    out = tmp_path / "syn"
    assert (
        cli(
            "shards",
            "synthetic",
            out,
            f"root={world_root}",
            "domain=pretrain",
            "train_per_class=4",
            "test_per_class=2",
            "val_per_class=1",
            "--maxcount",
            "64",
        ).exit_code
        == 0
    )
    result = cli(
        "pretrain",
        "demo/pretrain-student",
        f"output_dir={tmp_path / 'runs'}",
        "name=from-shards",
        "data={source: shards, train: '" + str(out / "train-{000000..000002}.tar") + "'}",
        "eval=[]",
        "train.batch_size=32",
        "train.max_steps=2",
        "export=null",
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "runs" / "from-shards" / "pretrain" / "data" / "rank0.json").read_text())
    assert len(record["shards"]) == 3


def test_shards_shuffle_by_default_and_no_shuffle_keeps_split_order(cli, tmp_path):
    make_folder(tmp_path / "photos", classes=("a", "b", "c"), per_class=4)

    def labels(*flags: str) -> list[int]:
        out = tmp_path / "-".join(flags or ("default",))
        assert cli("shards", tmp_path / "photos", out, "--format", "png", *flags).exit_code == 0
        return [
            s.label
            for s in load_shards_split(ShardsData(train=str(out / "train-000000.tar")), "train").samples
        ]

    in_order = labels("--no-shuffle")
    assert in_order == sorted(in_order)
    shuffled = labels()
    assert shuffled != in_order and sorted(shuffled) == in_order
    assert labels("--seed", "0") == shuffled and labels("--seed", "5") != shuffled
