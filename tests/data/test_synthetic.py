"""The synthetic world: classes, rendering, deterministic materialisation and the `synthetic` source."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdprompt.data import synthetic as syn
from kdprompt.data.sources import SOURCES
from kdprompt.data.splitfile import read_split_file
from kdprompt.data.synthetic import SyntheticData
from kdprompt.data.types import load_image
from kdprompt.errors import KdpromptError


def small(root: Path, **kw) -> SyntheticData:
    base = {"root": root, "image_size": 32, "train_per_class": 2, "val_per_class": 1, "test_per_class": 1}
    return SyntheticData(**{**base, **kw})


def files_of(world: Path) -> dict[str, bytes]:
    return {p.relative_to(world).as_posix(): p.read_bytes() for p in sorted(world.rglob("*")) if p.is_file()}


def test_class_names_are_colour_shape_compositions():
    names = syn.class_names()
    assert len(names) == len(syn.COLOURS) * len(syn.SHAPES) == 48
    assert len(set(names)) == len(names)
    for label, name in enumerate(names):
        colour, shape = syn.class_attributes(label)
        assert name == f"{colour} {shape}"


def test_base_and_novel_halves_each_cover_every_colour_and_shape():
    names = syn.class_names()
    n_base = math.ceil(len(names) / 2)
    for half in (names[:n_base], names[n_base:]):
        assert {n.split()[0] for n in half} == set(syn.COLOURS)
        assert {n.split()[1] for n in half} == set(syn.SHAPES)


def test_render_is_a_function_of_its_rng():
    a = syn.render(3, "downstream", np.random.default_rng(7), 32)
    b = syn.render(3, "downstream", np.random.default_rng(7), 32)
    c = syn.render(3, "downstream", np.random.default_rng(8), 32)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert syn.render(0, "pretrain", np.random.default_rng(0), 64).size == (64, 64)
    with pytest.raises(KdpromptError, match="pretrain, downstream"):
        syn.render(0, "elsewhere", np.random.default_rng(0), 32)


def test_rng_streams_differ_across_domains_splits_labels_and_indices():
    keys = [
        (0, d, s, lab, i)
        for d in syn.DOMAINS
        for s in ("train", "val", "test")
        for lab in (0, 1)
        for i in (0, 1)
    ]
    keys.append((1, "pretrain", "train", 0, 0))
    draws = {tuple(syn.image_rng(*k).integers(0, 2**62, 2)) for k in keys}
    assert len(draws) == len(keys)


def test_materialize_is_deterministic_and_seeded(tmp_path):
    w1 = syn.materialize(small(tmp_path / "a", domain="pretrain"))
    w2 = syn.materialize(small(tmp_path / "b", domain="pretrain"))
    assert w1.name == w2.name
    f1, f2 = files_of(w1), files_of(w2)
    assert f1 == f2  # byte-identical PNGs, split.json, classnames.txt, world.json
    w3 = syn.materialize(small(tmp_path / "a", domain="pretrain", seed=1))
    assert w3 != w1 and w3.name.startswith("pretrain-s1-32px-")
    f3 = files_of(w3)
    pngs = [k for k in f1 if k.endswith(".png")]
    assert pngs and all(f1[k] != f3[k] for k in pngs)


def test_images_do_not_depend_on_generation_order(tmp_path):
    cfg = small(tmp_path, domain="downstream", train_per_class=3)
    world = syn.materialize(cfg)
    name = syn.class_names()[5].replace(" ", "_")
    on_disk = np.asarray(Image.open(world / "images" / name / "train_2.png").convert("RGB"))
    alone = syn.render(5, "downstream", syn.image_rng(cfg.seed, "downstream", "train", 5, 2), 32)
    assert np.array_equal(on_disk, np.asarray(alone))


def test_world_layout(tmp_path):
    cfg = small(tmp_path, domain="downstream", train_per_class=2, val_per_class=1, test_per_class=3)
    world = syn.materialize(cfg)
    assert world.parent == tmp_path and world.name.startswith("downstream-s0-32px-")
    assert (world / "classnames.txt").read_text().splitlines() == syn.class_names()
    meta = json.loads((world / "world.json").read_text())
    assert meta["generator_version"] == syn.GENERATOR_VERSION
    assert meta["counts"] == {"train": 96, "val": 48, "test": 144}
    assert meta["style"]["noise"] == syn.DOWNSTREAM_STYLE.noise
    assert len(meta["base_classes"]) == len(meta["novel_classes"]) == 24
    raw = json.loads((world / "split.json").read_text())
    assert list(raw) == ["train", "val", "test"]
    assert raw["train"][0] == ["red_circle/train_0.png", 0, "red circle"]  # no caption field downstream
    assert len(list((world / "images").rglob("*.png"))) == 96 + 48 + 144
    # Counts a domain does not use are not part of its identity.
    assert syn.world_dir(small(tmp_path, domain="pretrain", val_per_class=5)) == syn.world_dir(
        small(tmp_path, domain="pretrain", val_per_class=0)
    )


def test_pretrain_captions_name_the_class(tmp_path):
    world = syn.materialize(small(tmp_path, domain="pretrain", train_per_class=6))
    splits = read_split_file(world / "split.json", world / "images")
    assert set(splits) == {"train", "test"}
    captions = [s.caption for s in splits["train"]]
    assert all(c and s.classname in c for c, s in zip(captions, splits["train"], strict=True))
    assert len(set(captions)) > 100  # varied templates, sizes and positions
    assert any("an orange" in c for c in captions) and not any("a orange" in c for c in captions)


def test_materialize_is_idempotent(tmp_path):
    cfg = small(tmp_path, domain="pretrain")
    world = syn.materialize(cfg)
    before = {p: p.stat().st_mtime_ns for p in world.rglob("*")}
    assert syn.materialize(cfg) == world
    assert {p: p.stat().st_mtime_ns for p in world.rglob("*")} == before


def test_incomplete_world_is_rebuilt(tmp_path):
    cfg = small(tmp_path, domain="downstream")
    world = syn.world_dir(cfg)
    # An interrupted build: a half-written world under the final name and a leftover temp directory.
    (world / "images" / "red_circle").mkdir(parents=True)
    (world / "images" / "red_circle" / "train_0.png").write_bytes(b"truncated")
    (world / "split.json").write_text("{}")
    leftover = tmp_path / f".{world.name}.abc123.tmp" / world.name
    leftover.mkdir(parents=True)
    (leftover / "split.json").write_text("{}")
    assert not syn.is_complete(world)
    assert syn.materialize(cfg) == world
    assert syn.is_complete(world)
    assert files_of(world) == files_of(syn.materialize(small(tmp_path / "clean", domain="downstream")))
    assert not any(p.name.endswith(".tmp") and p.name != leftover.parent.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("domain", ["pretrain", "downstream"])
def test_load_synthetic_split_round_trip(tmp_path, domain):
    assert SOURCES.get("synthetic") is syn.SyntheticData
    cfg = small(tmp_path, domain=domain, image_size=48)
    data = syn.load_synthetic_split(cfg, "test")
    assert data.name == "test" and data.classnames == syn.class_names()
    assert len(data) == 48 and sorted({s.label for s in data.samples}) == list(range(48))
    for s in data.samples:
        assert s.classname == data.classnames[s.label]
        assert os.path.isfile(s.image)
        assert (s.caption is not None) == (domain == "pretrain")
    assert load_image(data.samples[0]).size == (48, 48)


def _high_freq(img: np.ndarray) -> float:
    return float(np.abs(np.diff(img, axis=1)).mean() + np.abs(np.diff(img, axis=0)).mean())


def _border_std(img: np.ndarray) -> float:
    border = np.concatenate(
        [
            img[:2].reshape(-1, 3),
            img[-2:].reshape(-1, 3),
            img[:, :2].reshape(-1, 3),
            img[:, -2:].reshape(-1, 3),
        ]
    )
    return float(border.std(axis=0).mean())


def test_downstream_is_more_varied_than_pretrain():
    stats = {}
    for domain in syn.DOMAINS:
        imgs = [
            np.asarray(
                syn.render(lab, domain, syn.image_rng(0, domain, "test", lab, 0), 32), dtype=np.float32
            )
            for lab in range(48)
        ]
        stats[domain] = (np.mean([_high_freq(x) for x in imgs]), np.mean([_border_std(x) for x in imgs]))
    (hf_pre, bg_pre), (hf_down, bg_down) = stats["pretrain"], stats["downstream"]
    assert hf_down > 1.2 * hf_pre
    assert bg_down > 1.2 * bg_pre


def test_downstream_colours_are_cast_away_from_their_names():
    # The systematic hue shift is what zero-shot CLIP stumbles on and prompt learning undoes.
    assert syn.STYLES["pretrain"].hue_shift == 0
    assert 0.03 < syn.STYLES["downstream"].hue_shift < 0.1


def test_unknown_split_lists_the_available_ones(tmp_path):
    with pytest.raises(KdpromptError, match=r"no 'val' split; available: train, test"):
        syn.load_synthetic_split(small(tmp_path, domain="pretrain"), "val")
    with pytest.raises(KdpromptError, match=r"available: train, test \(val_per_class is 0\)"):
        syn.load_synthetic_split(small(tmp_path, domain="downstream", val_per_class=0), "val")
    with pytest.raises(KdpromptError, match="available: train, val, test"):
        syn.load_synthetic_split(small(tmp_path, domain="downstream"), "holdout")


def test_a_killed_builds_temporary_is_removed_at_the_next_build(tmp_path):
    cfg = small(tmp_path)
    world = syn.world_dir(cfg)
    stale = world.parent / f".{world.name}.k1ll3d_0.tmp"
    (stale / world.name / "images").mkdir(parents=True)
    assert syn.materialize(cfg) == world and syn.is_complete(world)
    assert not stale.exists()
