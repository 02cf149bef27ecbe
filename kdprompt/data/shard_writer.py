"""Writing a :class:`~kdprompt.data.types.Split` as webdataset tar shards (layout: :mod:`~kdprompt.data.shard_format`)."""

from __future__ import annotations

import glob
import io
import json
import logging
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
from kdprompt.data.shard_urls import load_sizes_file
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError
from kdprompt.faults import crash_point
from kdprompt.folder_lock import folder_lock, remove_stale_temporaries
from kdprompt.io import write_json_atomic

logger = logging.getLogger(__name__)

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}
_KEEP_MODES = {"jpg": {"RGB", "L"}, "png": {"RGB", "RGBA", "L", "LA", "P"}}
_MAX_KEY_TAIL = 64  # keeps "<index>_<tail>.json" well under the 100-character ustar name limit
# A write's temporary folder: ".<prefix>-shards.<8 random chars>.tmp" (tempfile.mkdtemp), holding
# its tars and, once they are all written, its commit record.
_TMP_TAG = "-shards"
_TMP_NAME = re.compile(rf"\.[A-Za-z0-9_.-]+{_TMP_TAG}\.[a-z0-9_]{{8}}\.tmp")
_COMMIT_FILE = "commit.json"


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
    ``sizes.json`` (merged with other prefixes) and ``classnames.json`` are updated atomically. One
    writer at a time holds the folder's lock; a write killed before all its shards were written is
    discarded by the next one, a write killed after is finished by it (:func:`recover_shard_writes`).

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
            an invalid ``sizes.json``, or class names conflicting with other shards in ``out_dir``.
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
    with folder_lock(out_dir):
        # We hold the folder's lock, so no live writer owns a temporary in it: they are all stale.
        finished = recover_shard_writes(out_dir)
        existing = sorted(out_dir.glob(_shard_glob(prefix)))
        if existing and not overwrite:
            names = ", ".join(p.name for p in existing[:SHOW_SHARDS])
            more = f" and {len(existing) - SHOW_SHARDS} more" if len(existing) > SHOW_SHARDS else ""
            how = "finished an interrupted earlier write: " if prefix in finished else ""
            raise KdpromptError(
                f"{how}{out_dir} already holds {len(existing)} shard(s) with prefix {prefix!r}: {names}{more}; "
                "pass overwrite=True (--overwrite) to replace them, or choose another prefix/folder"
            )
        sizes_path = out_dir / SIZES_FILE
        others = {k: v for k, v in _sizes(sizes_path).items() if not _own(prefix).fullmatch(k)}
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

        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}{_TMP_TAG}.", suffix=".tmp", dir=out_dir))
        try:
            written = _write_tars(samples, tmp, prefix, image_format, maxcount, quality)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        crash_point("shards.tars_written")
        # The commit point: from here on, a killed write is finished by the next one (see
        # recover_shard_writes) instead of being thrown away.
        commit = {
            "prefix": prefix,
            "sizes": written,
            "classnames": list(split.classnames),
            "remove": [p.name for p in existing if p.name not in written],
        }
        write_json_atomic(tmp / _COMMIT_FILE, commit)
        crash_point("shards.committed")
        _finish(out_dir, tmp, commit)
    return written


def _write_tars(
    samples: Iterable[Sample], tmp: Path, prefix: str, image_format: str, maxcount: int, quality: int
) -> dict[str, int]:
    """Encode ``samples`` as ``{prefix}-NNNNNN.tar`` files in ``tmp``; returns their sample counts."""
    written: dict[str, int] = {}
    writer: wds.TarWriter | None = None

    def close() -> None:
        assert writer is not None
        writer.close()
        with (tmp / name).open("rb") as fh:
            os.fsync(fh.fileno())  # durable before the commit record names it
        crash_point("shards.tar_written")

    name = ""
    try:
        for i, sample in enumerate(samples):
            if i % maxcount == 0:
                if writer is not None:
                    close()
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
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    if writer is not None:
        close()
    return written


def _own(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"-\d{6}\.tar")


def _sizes(path: Path) -> dict[str, int]:
    return load_sizes_file(path) if path.exists() else {}


def _finish(out_dir: Path, tmp: Path, commit: dict[str, Any]) -> None:
    """Move a committed write's shards into place, then update sizes.json and classnames.json.

    Every step can be repeated, so a write killed anywhere in here is finished by running this again.
    """
    for name in commit["remove"]:
        (out_dir / name).unlink(missing_ok=True)
    for name in commit["sizes"]:
        if (tmp / name).exists():  # else moved before the crash
            os.replace(tmp / name, out_dir / name)
    crash_point("shards.moved")
    sizes_path = out_dir / SIZES_FILE
    others = {k: v for k, v in _sizes(sizes_path).items() if not _own(commit["prefix"]).fullmatch(k)}
    write_json_atomic(sizes_path, {**others, **commit["sizes"]})
    write_json_atomic(out_dir / CLASSNAMES_FILE, commit["classnames"])
    shutil.rmtree(tmp, ignore_errors=True)


def recover_shard_writes(out_dir: Path) -> list[str]:
    """Finish or discard the shard writes a kill interrupted in ``out_dir``; hold its folder lock first.

    A write's temporary folder that holds its commit record is finished (its shards moved into place,
    sizes.json updated); any other is discarded, with the temporaries of sizes.json and
    classnames.json. Only names this writer creates are touched.

    Returns:
        The prefixes whose interrupted writes were finished.
    """
    finished: list[str] = []
    for path in sorted(Path(out_dir).iterdir()):
        if not (_TMP_NAME.fullmatch(path.name) and path.is_dir()):
            continue
        commit_path = path / _COMMIT_FILE
        commit = _read_json(commit_path, "commit record") if commit_path.is_file() else None
        if isinstance(commit, dict) and {"prefix", "sizes", "classnames", "remove"} <= commit.keys():
            logger.warning("finishing the interrupted write of %s shards in %s", commit["prefix"], out_dir)
            _finish(Path(out_dir), path, commit)
            finished.append(commit["prefix"])
        else:
            shutil.rmtree(path, ignore_errors=True)
    for name in (SIZES_FILE, CLASSNAMES_FILE):
        remove_stale_temporaries(Path(out_dir) / name)
    return finished


__all__ = ["recover_shard_writes", "write_shards"]
