"""Writing a :class:`~kdprompt.data.types.Split` as webdataset tar shards (layout: :mod:`~kdprompt.data.shard_format`)."""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import webdataset as wds
from PIL import Image

from kdprompt.data.shard_format import CLASSNAMES_FILE, DECODE_ERRORS, SHOW_SHARDS, SIZES_FILE
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError
from kdprompt.io import write_json_atomic

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}
_KEEP_MODES = {"jpg": {"RGB", "L"}, "png": {"RGB", "RGBA", "L", "LA", "P"}}
_MAX_KEY_TAIL = 64  # keeps "<index>_<tail>.json" well under the 100-character ustar name limit


def _safe_key(index: int, key: str) -> str:
    # Webdataset groups members by the text before the first dot, and ustar names are short:
    # keep [A-Za-z0-9_-], prefix the index so keys stay unique whatever the sanitising merges.
    tail = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")[-_MAX_KEY_TAIL:]
    return f"{index:08d}_{tail}" if tail else f"{index:08d}"


def _shard_glob(prefix: str) -> str:
    return f"{glob.escape(prefix)}-{'[0-9]' * 6}.tar"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KdpromptError(f"cannot read {what} {path}: {exc}") from None


def _encode_image(sample: Sample, image_format: str, quality: int) -> bytes:
    """Return the sample's image encoded as ``image_format``; raw bytes are kept when already so."""
    where = sample.key or (sample.image if isinstance(sample.image, str) else "<bytes>")
    if isinstance(sample.image, str) and sample.key and sample.key != sample.image:
        where = f"{sample.key} ({sample.image})"
    try:
        raw = sample.image if isinstance(sample.image, bytes) else Path(sample.image).read_bytes()
        img = Image.open(io.BytesIO(raw))
        img.load()  # full decode: a truncated file must fail here, not in a training run
    except FileNotFoundError:
        raise KdpromptError(f"image file not found: {where}; nothing was written") from None
    except DECODE_ERRORS as exc:
        raise KdpromptError(f"cannot decode image {where}: {exc}; nothing was written") from None
    if img.format == _PIL_FORMAT[image_format]:
        return raw
    if img.mode not in _KEEP_MODES[image_format]:
        img = img.convert("RGB")
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    split: Split,
    out_dir: Path,
    *,
    prefix: str | None = None,
    image_format: Literal["jpg", "png"] = "jpg",
    maxcount: int = 1000,
    quality: int = 95,
    overwrite: bool = False,
    progress: bool = False,
    shuffle_seed: int | None = None,
) -> dict[str, int]:
    """Write ``split`` as ``{prefix}-{i:06d}.tar`` webdataset shards under ``out_dir``.

    Each sample becomes members ``<ext>`` (the image, re-encoded unless already ``image_format``),
    ``cls`` (label), ``txt`` (caption, when present) and ``json`` (key, label, classname, caption).
    Shards are written into a temporary folder and moved into place only when all succeeded;
    ``sizes.json`` (merged with other prefixes) and ``classnames.json`` are updated atomically.

    CoOp's splits list their images class by class; written in that order, each shard holds a few
    classes and a streaming reader's shuffle buffer cannot make batches i.i.d. ``shuffle_seed`` writes
    the samples in a seeded random order instead, so every shard is a uniform sample of the split.

    Args:
        split: the samples to write.
        out_dir: destination folder (created).
        prefix: shard name prefix; default ``split.name``.
        image_format: image member format.
        maxcount: samples per shard.
        quality: JPEG quality when re-encoding.
        overwrite: replace existing shards of the same prefix.
        progress: show a tqdm progress bar.
        shuffle_seed: write the samples in the order of ``random.Random(shuffle_seed).shuffle``;
            None keeps the split's order.

    Returns:
        ``{shard_file_name: n_samples}`` of the shards written.

    Raises:
        KdpromptError: existing shards without ``overwrite``, an undecodable image, an empty split,
            or class names conflicting with other shards in ``out_dir``.
    """
    prefix = prefix or split.name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise KdpromptError(f"shard prefix {prefix!r} may only contain letters, digits, '_', '-', '.'")
    if image_format not in _PIL_FORMAT:
        raise KdpromptError(f"image_format must be one of {sorted(_PIL_FORMAT)}, got {image_format!r}")
    if maxcount < 1:
        raise KdpromptError(f"maxcount must be >= 1, got {maxcount}")
    if len(split) == 0:
        raise KdpromptError(f"split {split.name!r} has no samples; nothing to write to {out_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    existing = sorted(out_dir.glob(_shard_glob(prefix)))
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:SHOW_SHARDS])
        more = f" and {len(existing) - SHOW_SHARDS} more" if len(existing) > SHOW_SHARDS else ""
        raise KdpromptError(
            f"{out_dir} already holds {len(existing)} shard(s) with prefix {prefix!r}: {names}{more}; "
            "pass overwrite=True (--overwrite) to replace them, or choose another prefix/folder"
        )
    own = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    sizes_path = out_dir / SIZES_FILE
    old_sizes: dict[str, int] = _read_json(sizes_path, "shard sizes") if sizes_path.exists() else {}
    others = {k: v for k, v in old_sizes.items() if not own.fullmatch(k)}
    names_path = out_dir / CLASSNAMES_FILE
    if others and names_path.exists():
        # Other prefixes' labels index classnames.json: silently replacing it would relabel them.
        old_names = _read_json(names_path, "class names")
        if old_names != list(split.classnames):
            raise KdpromptError(
                f"{names_path} lists different class names than split {split.name!r}, and shards "
                f"{', '.join(sorted(others)[:SHOW_SHARDS])} rely on it; write to another folder"
            )

    samples: Iterable[Sample] = split.samples
    if shuffle_seed is not None:
        order = list(range(len(split)))
        random.Random(shuffle_seed).shuffle(order)
        samples = [split.samples[i] for i in order]
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, total=len(split), desc=f"shards {prefix}", unit="img")

    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-shards.", suffix=".tmp", dir=out_dir))
    written: dict[str, int] = {}
    try:
        writer: wds.TarWriter | None = None
        name = ""
        try:
            for i, sample in enumerate(samples):
                if i % maxcount == 0:
                    if writer is not None:
                        writer.close()
                    name = f"{prefix}-{i // maxcount:06d}.tar"
                    # fixed mtime: identical input gives byte-identical shards
                    writer = wds.TarWriter(str(tmp / name), encoder=False, mtime=0.0)
                    written[name] = 0
                meta: dict[str, Any] = {
                    "key": sample.key,
                    "label": sample.label,
                    "classname": sample.classname,
                }
                member: dict[str, Any] = {
                    "__key__": _safe_key(i, sample.key),
                    image_format: _encode_image(sample, image_format, quality),
                    "cls": str(int(sample.label)).encode("ascii"),
                }
                if sample.caption is not None:
                    member["txt"] = sample.caption.encode("utf-8")
                    meta["caption"] = sample.caption
                member["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                assert writer is not None
                writer.write(member)
                written[name] += 1
        finally:
            if writer is not None:
                writer.close()
        # Everything encoded: now replace. Stale shards of this prefix beyond the new count go first.
        for old in existing:
            if old.name not in written:
                old.unlink()
        for name in written:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(sizes_path, {**others, **written})
    write_json_atomic(names_path, list(split.classnames))
    return written


__all__ = ["write_shards"]
