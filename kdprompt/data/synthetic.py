"""The built-in synthetic world: coloured shapes named compositionally ("red triangle").

Two domains share the 48 classes (8 colours x 6 shapes):

* ``pretrain``: clean-ish renders on plain dark backgrounds, every image captioned; tiny CLIPs are
  contrastively pre-trained on it.
* ``downstream``: a shifted domain (textured backgrounds, clutter, noise, wider sizes, free
  rotation, colour jitter) on which prompt-learned teachers and distilled students are trained and
  evaluated, so that zero-shot accuracy leaves room for them to help.

A world is materialised once as PNG files plus a CoOp-format ``split.json`` and read back through
:func:`~kdprompt.data.splitfile.read_split_file`, the same path real data takes. Everything is a pure
function of (seed, domain, image size, per-class counts, :data:`GENERATOR_VERSION`, the domain's
:class:`Style`); each image has its own RNG stream, so generation order does not matter.

The difficulty knobs are the two :class:`Style` constants :data:`PRETRAIN_STYLE` and
:data:`DOWNSTREAM_STYLE`; they are part of the world's hash, so changing one regenerates the world.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from kdprompt.data.source import SOURCES, DataSource
from kdprompt.data.splitfile import read_split_file, write_split_file
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError
from kdprompt.folder_lock import folder_lock, remove_stale_temporaries
from kdprompt.io import atomic_path

# Bump whenever rendering, captions or the layout change: it is part of every world's hash.
GENERATOR_VERSION = 2

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 35),
    "green": (35, 175, 55),
    "cyan": (40, 215, 225),
    "blue": (35, 75, 235),
    "purple": (145, 55, 205),
    "pink": (255, 135, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

DOMAINS = ("pretrain", "downstream")
DOMAIN_SPLITS: dict[str, tuple[str, ...]] = {
    "pretrain": ("train", "test"),
    "downstream": ("train", "val", "test"),
}
BACKGROUND_PATTERNS = ("plain", "gradient", "stripes", "checker", "blotches")


@dataclass(frozen=True)
class Style:
    """How one domain renders: the difficulty knobs (sizes and offsets are fractions of the image side).

    Attributes:
        size_range: (min, max) diameter of the shape's bounding circle.
        position_jitter: max offset of the shape's centre from the image centre (clamped so the
            shape stays inside the image).
        rotation: max absolute rotation in degrees (uniform in [-rotation, rotation]).
        hue_jitter: max absolute hue shift of the shape colour, in turns (1.0 = full circle).
        hue_shift: a systematic hue rotation of every shape colour, in turns: a colour cast that keeps
            colours distinguishable but moves them away from their names (the downstream shift that
            zero-shot CLIP stumbles on and prompt learning can learn to undo).
        brightness_range: (min, max) multiplier of the shape colour's HSV value.
        saturation_range: (min, max) multiplier of the shape colour's saturation.
        shading: amplitude of a linear light gradient across the shape (0 = flat fill).
        background_value: (min, max) HSV value of the background colours (kept dark-ish so shapes pop).
        background_saturation: max HSV saturation of the background colours.
        background_patterns: patterns to draw the background from (see :data:`BACKGROUND_PATTERNS`).
        texture_strength: contrast between the background pattern's two colours (0 = plain).
        clutter: max number of small distractor dots/strokes.
        noise: max std of the per-pixel Gaussian noise, in 0-255 units (each image draws its own
            std in [noise/2, noise]).
    """

    size_range: tuple[float, float]
    position_jitter: float
    rotation: float
    hue_jitter: float
    hue_shift: float
    brightness_range: tuple[float, float]
    saturation_range: tuple[float, float]
    shading: float
    background_value: tuple[float, float]
    background_saturation: float
    background_patterns: tuple[str, ...]
    texture_strength: float
    clutter: int
    noise: float


PRETRAIN_STYLE = Style(
    size_range=(0.4, 0.85),
    position_jitter=0.2,
    rotation=180.0,
    hue_jitter=0.01,
    hue_shift=0.0,
    brightness_range=(0.85, 1.0),
    saturation_range=(0.9, 1.0),
    shading=0.1,
    background_value=(0.10, 0.40),
    background_saturation=0.25,
    background_patterns=BACKGROUND_PATTERNS,
    texture_strength=0.4,
    clutter=1,
    noise=6.0,
)
DOWNSTREAM_STYLE = Style(
    size_range=(0.35, 0.9),
    position_jitter=0.25,
    rotation=180.0,
    hue_jitter=0.015,
    hue_shift=0.07,
    brightness_range=(0.75, 1.0),
    saturation_range=(0.8, 1.0),
    shading=0.25,
    background_value=(0.15, 0.55),
    background_saturation=0.4,
    background_patterns=BACKGROUND_PATTERNS,
    texture_strength=0.6,
    clutter=2,
    noise=10.0,
)
STYLES: dict[str, Style] = {"pretrain": PRETRAIN_STYLE, "downstream": DOWNSTREAM_STYLE}

# Shapes are drawn on a mask this many times larger than the image and box-downsampled (anti-aliasing).
MAX_SUPERSAMPLE = 4
CAPTION_TEMPLATES = (
    "{np}",
    "a photo of {np}.",
    "{np} {pos}",
    "a photo of {np} {pos}.",
    "an image of {np}",
    "a picture showing {np} {pos}.",
    "{np} on a dark background",
    "there is {np} {pos}.",
    "a drawing of {np}.",
    "a rendering of {np}.",
)


def _label_order() -> list[tuple[int, int]]:
    """(colour, shape) index pairs in label order: the base half first, then the novel half.

    A checkerboard over the colour x shape grid decides the halves, so each half holds every colour
    (with 3 shapes) and every shape (with 4 colours): novel classes are new combinations of seen attributes.
    """
    cells = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
    return [cell for cell in cells if sum(cell) % 2 == 0] + [cell for cell in cells if sum(cell) % 2 == 1]


_LABELS = _label_order()
_COLOUR_NAMES = list(COLOURS)


_CLASS_NAMES = [f"{_COLOUR_NAMES[c]} {SHAPES[s]}" for c, s in _LABELS]


def class_names() -> list[str]:
    """The class names ("red triangle", ...) in label order; base = the first ceil(n/2)."""
    return list(_CLASS_NAMES)


def class_attributes(label: int) -> tuple[str, str]:
    """The (colour, shape) of class ``label``."""
    c, s = _LABELS[label]
    return _COLOUR_NAMES[c], SHAPES[s]


def _style(domain: str) -> Style:
    if domain not in STYLES:
        raise KdpromptError(f"unknown synthetic domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return STYLES[domain]


# ---------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderInfo:
    """What was drawn, for captions: ``size`` is the diameter fraction, ``dx``/``dy`` the centre offset."""

    size: float
    dx: float
    dy: float


def _shape_polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with circumradius ``r``, rotated by ``theta`` radians."""
    if shape == "square":
        pts = [(1.0, a) for a in (0.25, 0.75, 1.25, 1.75)]
    elif shape == "triangle":
        # Point up at theta = 0 (y grows downwards).
        pts = [(1.0, -0.5 + k * 2 / 3) for k in range(3)]
    elif shape == "star":
        # A fat inner radius keeps the five points readable at 32 px.
        pts = [(1.0 if k % 2 == 0 else 0.48, -0.5 + k / 5) for k in range(10)]
    elif shape == "cross":
        w = 0.34  # arm half-width relative to r
        corners = [
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
        ]
        # Scale so the arm tips (not the corners) sit on the circumradius.
        pts = [(math.hypot(x, y), math.atan2(y, x) / math.pi) for x, y in corners]
    else:
        raise ValueError(f"{shape} is not a polygon")
    return [
        (cx + r * m * math.cos(math.pi * a + theta), cy + r * m * math.sin(math.pi * a + theta))
        for m, a in pts
    ]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """An anti-aliased float32 coverage mask (size x size, in [0, 1]) of one shape."""
    ss = max(2, min(MAX_SUPERSAMPLE, 256 // size))
    big = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = cx * ss, cy * ss, r * ss
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, theta), fill=255)
    small = big.reduce(ss)  # box filter: exact area coverage, no ringing
    return np.asarray(small, dtype=np.float32) * (1.0 / 255.0)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return (
        np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32)
        * 255
    )


def _random_bg_colour(style: Style, rng: np.random.Generator) -> np.ndarray:
    return _hsv(
        rng.random(), rng.uniform(0, style.background_saturation), rng.uniform(*style.background_value)
    )


def _background(style: Style, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float32 background: two muted colours mixed by a random pattern."""
    a = _random_bg_colour(style, rng)
    b = _random_bg_colour(style, rng)
    pattern = style.background_patterns[rng.integers(len(style.background_patterns))]
    if pattern == "plain":
        return np.broadcast_to(a, (size, size, 3)).copy()
    u = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = u[None, :], u[:, None]
    angle = rng.uniform(0, 2 * math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    if pattern == "gradient":
        p = along - along.min()
        p = p / max(float(p.max()), 1e-6)
    elif pattern == "stripes":
        freq = rng.uniform(2.0, 6.0)  # cycles per image side
        p = 0.5 + 0.5 * np.sin(2 * math.pi * freq * along + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:
            p = (p > 0.5).astype(np.float32)
    elif pattern == "checker":
        cells = int(rng.integers(3, 8))
        p = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float32)
    elif pattern == "blotches":
        k = int(rng.integers(3, 6))
        low = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8))
        p = np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    else:
        raise ValueError(f"unknown background pattern {pattern!r}")
    p = np.broadcast_to(p, (size, size))[..., None] * style.texture_strength
    return a + (b - a) * p


def _draw_clutter(bg: np.ndarray, style: Style, rng: np.random.Generator, size: int) -> np.ndarray:
    """Small distractor dots and strokes in muted random colours (drawn under the shape)."""
    n = int(rng.integers(0, style.clutter + 1))
    if n == 0:
        return bg
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        colour = tuple(int(v) for v in _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.3, 0.9)))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            r = size * rng.uniform(0.02, 0.05)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            length, angle = size * rng.uniform(0.1, 0.25), rng.uniform(0, math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=max(1, size // 32))
    return np.asarray(img, dtype=np.float32)


def _render(label: int, style: Style, rng: np.random.Generator, size: int) -> tuple[Image.Image, RenderInfo]:
    c, s = _LABELS[label]
    # Geometry first, so the draws that captions depend on come in a fixed order.
    diameter = rng.uniform(*style.size_range)
    room = max(0.0, 0.5 - diameter / 2)
    lim = min(style.position_jitter, room)
    dx, dy = rng.uniform(-lim, lim, 2) if lim > 0 else (0.0, 0.0)
    theta = math.radians(rng.uniform(-style.rotation, style.rotation))

    h, sat, val = colorsys.rgb_to_hsv(*(v / 255 for v in COLOURS[_COLOUR_NAMES[c]]))
    fg = _hsv(
        h + style.hue_shift + rng.uniform(-style.hue_jitter, style.hue_jitter),
        sat * rng.uniform(*style.saturation_range),
        val * rng.uniform(*style.brightness_range),
    )

    bg = _background(style, rng, size)
    if style.clutter:
        bg = _draw_clutter(bg, style, rng, size)
    mask = _shape_mask(SHAPES[s], size, (0.5 + dx) * size, (0.5 + dy) * size, diameter * size / 2, theta)

    # A linear light gradient over the shape (shading), in a random direction.
    u = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    light = rng.uniform(0, 2 * math.pi)
    gain = 1.0 + style.shading * 2 * (u[None, :] * math.cos(light) + u[:, None] * math.sin(light))
    fg_field = fg[None, None, :] * gain[..., None]

    alpha = mask[..., None]
    out = bg * (1.0 - alpha) + fg_field * alpha
    if style.noise > 0:
        std = rng.uniform(style.noise / 2, style.noise)
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * std
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img, RenderInfo(size=float(diameter), dx=float(dx), dy=float(dy))


def render(label: int, domain: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Render one RGB image of class ``label`` in ``domain`` ("pretrain" or "downstream").

    Args:
        label: class index into :func:`class_names`.
        domain: "pretrain" (clean) or "downstream" (shifted).
        rng: the image's random generator (all randomness comes from it).
        image_size: side of the square image in pixels.
    """
    return _render(label, _style(domain), rng, image_size)[0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(label: int, info: RenderInfo, rng: np.random.Generator) -> str:
    """A varied caption for a render of ``label``; it always contains the exact class name."""
    name = _CLASS_NAMES[label]
    size_word = "small" if info.size < 0.6 else "large" if info.size > 0.7 else ""
    words = f"{size_word} {name}" if size_word and rng.random() < 0.5 else name
    np_ = f"{_article(words)} {words}"
    # Image y grows downwards: negative dy is the top.
    vert = "top" if info.dy < -0.06 else "bottom" if info.dy > 0.06 else ""
    horiz = "left" if info.dx < -0.06 else "right" if info.dx > 0.06 else ""
    if vert and horiz:
        pos = f"at the {vert} {horiz}"
    elif vert:
        pos = f"at the {vert}"
    elif horiz:
        pos = f"on the {horiz}"
    else:
        pos = "in the center"
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(np=np_, pos=pos)


# -------------------------------------------------------------------------------------- materialise


def image_rng(seed: int, domain: str, split: str, label: int, index: int) -> np.random.Generator:
    """The RNG of one image: an independent stream per (seed, domain, split, label, index)."""
    key = f"kdprompt-synthetic|v{GENERATOR_VERSION}|{seed}|{domain}|{split}|{label}|{index}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:16], "little"))


def split_counts(cfg: SyntheticData) -> dict[str, int]:
    """Images per class of each split the domain has (a downstream val of 0 per class is left out)."""
    per_class = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
    return {s: per_class[s] for s in DOMAIN_SPLITS[cfg.domain] if per_class[s] > 0}


def _world_spec(cfg: SyntheticData) -> dict[str, Any]:
    """Everything the world's content depends on (and nothing else: not the root)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "domain": cfg.domain,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "per_class": split_counts(cfg),
        "style": asdict(_style(cfg.domain)),
        "classnames": class_names(),
    }


def world_dir(cfg: SyntheticData) -> Path:
    """Where ``cfg``'s world lives: ``root/<domain>-s<seed>-<size>px-<hash>``."""
    spec = json.dumps(_world_spec(cfg), sort_keys=True).encode()
    short = hashlib.sha256(spec).hexdigest()[:10]
    return Path(cfg.root).expanduser() / f"{cfg.domain}-s{cfg.seed}-{cfg.image_size}px-{short}"


def is_complete(world: Path) -> bool:
    """Whether ``world`` was fully built (``world.json`` is written last)."""
    return (Path(world) / "world.json").is_file()


def _build(cfg: SyntheticData, out: Path) -> None:
    """Write the whole world into ``out`` (a fresh directory); world.json last."""
    style = _style(cfg.domain)
    names = class_names()
    image_dir = out / "images"
    folders = [n.replace(" ", "_") for n in names]
    for f in folders:
        (image_dir / f).mkdir(parents=True)
    captioned = cfg.domain == "pretrain"
    splits: dict[str, list[Sample]] = {}
    counts = split_counts(cfg)
    for split, per_class in counts.items():
        samples = []
        for label, name in enumerate(names):
            for i in range(per_class):
                rng = image_rng(cfg.seed, cfg.domain, split, label, i)
                img, info = _render(label, style, rng, cfg.image_size)
                path = image_dir / folders[label] / f"{split}_{i}.png"
                img.save(path, format="PNG", compress_level=1)
                text = caption(label, info, rng) if captioned else None
                samples.append(Sample(str(path), label, name, text, key=f"{folders[label]}/{split}_{i}.png"))
        splits[split] = samples
    write_split_file(out / "split.json", splits, image_dir)
    (out / "classnames.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    n_base = math.ceil(len(names) / 2)
    meta = {
        **_world_spec(cfg),
        "counts": {s: len(v) for s, v in splits.items()},
        "n_classes": len(names),
        "base_classes": names[:n_base],
        "novel_classes": names[n_base:],
        "captioned": captioned,
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def materialize(cfg: SyntheticData) -> Path:
    """Generate ``cfg``'s world on disk once and return its directory.

    The directory holds ``images/<class_name>/<split>_<i>.png``, ``split.json`` (CoOp split format,
    captions as a 4th field in the pretrain domain), ``classnames.txt`` and ``world.json``. It is built
    in a temporary directory and renamed into place, so a complete-looking world is a complete one;
    a finished world is returned as is.
    """
    world = world_dir(cfg)
    if is_complete(world):
        return world
    with folder_lock(world):
        if is_complete(world):  # another process built it while we waited
            return world
        remove_stale_temporaries(world)  # builds killed earlier (we hold the lock: none is live)
        with atomic_path(world) as tmp:
            tmp.mkdir()
            _build(cfg, tmp)
    return world


def load_synthetic_split(cfg: SyntheticData, split: str) -> Split:
    """Load split ``split`` of the synthetic world ``cfg``, materialising it on first use.

    Raises:
        KdpromptError: the domain has no such split (the message lists the available ones).
    """
    world = materialize(cfg)
    splits = read_split_file(world / "split.json", world / "images")
    if split not in splits:
        raise KdpromptError(
            f"the synthetic {cfg.domain} world has no {split!r} split; available: {', '.join(splits)}"
            + (" (val_per_class is 0)" if split == "val" and cfg.domain == "downstream" else "")
        )
    classnames = (world / "classnames.txt").read_text(encoding="utf-8").splitlines()
    meta = {"source": "synthetic", "root": str(world), "domain": cfg.domain, "seed": cfg.seed}
    return Split(samples=splits[split], classnames=classnames, name=split, meta=meta)


@SOURCES.register("synthetic")
class SyntheticData(DataSource):
    """The built-in synthetic world of coloured shapes, materialised under ``root`` on first use."""

    source: Literal["synthetic"] = "synthetic"
    root: Path = Path("cache/synthetic")
    domain: Literal["pretrain", "downstream"] = "downstream"
    seed: int = 0
    image_size: int = Field(default=32, ge=16, le=256)
    train_per_class: int = Field(default=64, ge=1)
    val_per_class: int = Field(default=8, ge=0)
    test_per_class: int = Field(default=32, ge=1)
    # Lossless: the world's exact pixels reach training.
    shard_image_format: ClassVar[str] = "png"

    def load_split(self, split: str) -> Split:
        """See :func:`load_synthetic_split`."""
        return load_synthetic_split(self, split)

    def identity(self) -> dict[str, Any]:
        """The world's directory name (generator version and style hashed in), not where it is stored."""
        return {
            **{k: v for k, v in self.model_dump(mode="json").items() if k != "root"},
            "world": world_dir(self).name,
        }


__all__ = [
    "COLOURS",
    "DOMAINS",
    "DOMAIN_SPLITS",
    "DOWNSTREAM_STYLE",
    "GENERATOR_VERSION",
    "PRETRAIN_STYLE",
    "SHAPES",
    "STYLES",
    "RenderInfo",
    "Style",
    "SyntheticData",
    "caption",
    "class_attributes",
    "class_names",
    "image_rng",
    "is_complete",
    "load_synthetic_split",
    "materialize",
    "render",
    "split_counts",
    "world_dir",
]
