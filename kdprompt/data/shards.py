"""Webdataset shards: writing a :class:`Split` to tar shards, streaming batches, reading small splits.

Layout written by :func:`write_shards` (and read by everything here)::

    out/
      train-000000.tar   members <key>.jpg|png, <key>.cls, <key>.txt (captioned samples), <key>.json
      train-000001.tar
      sizes.json         {"train-000000.tar": 1000, ...}   (all prefixes in the folder)
      classnames.json    ["class a", "class b", ...]

The reader also accepts img2dataset-style shards (``<key>.jpg``, ``<key>.txt``, ``<key>.json``, no
``cls``): labels then come from ``json["label"]`` or are -1 (unlabelled).
"""

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
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import webdataset as wds
from braceexpand import braceexpand  # a dependency of webdataset
from PIL import Image, UnidentifiedImageError

from kdprompt.data.config import ShardsData
from kdprompt.data.sources import SOURCES
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError
from kdprompt.io import write_json_atomic

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"
CLASSNAMES_FILE = "classnames.json"
_REMOTE_SCHEMES = ("pipe", "http", "https", "s3", "gs", "ais", "hf")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}
_KEEP_MODES = {"jpg": {"RGB", "L"}, "png": {"RGB", "RGBA", "L", "LA", "P"}}
_MAX_KEY_TAIL = 64  # keeps "<index>_<tail>.json" well under the 100-character ustar name limit
_SHOW_MISSING = 5
# What a bad member can raise while decoding; anything else is a bug and propagates.
_DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    KeyError,
)

# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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
    except _DECODE_ERRORS as exc:
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
) -> dict[str, int]:
    """Write ``split`` as ``{prefix}-{i:06d}.tar`` webdataset shards under ``out_dir``.

    Each sample becomes members ``<ext>`` (the image, re-encoded unless already ``image_format``),
    ``cls`` (label), ``txt`` (caption, when present) and ``json`` (key, label, classname, caption).
    Shards are written into a temporary folder and moved into place only when all succeeded;
    ``sizes.json`` (merged with other prefixes) and ``classnames.json`` are updated atomically.

    Args:
        split: the samples to write.
        out_dir: destination folder (created).
        prefix: shard name prefix; default ``split.name``.
        image_format: image member format.
        maxcount: samples per shard.
        quality: JPEG quality when re-encoding.
        overwrite: replace existing shards of the same prefix.
        progress: show a tqdm progress bar.

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
        names = ", ".join(p.name for p in existing[:_SHOW_MISSING])
        more = f" and {len(existing) - _SHOW_MISSING} more" if len(existing) > _SHOW_MISSING else ""
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
                f"{', '.join(sorted(others)[:_SHOW_MISSING])} rely on it; write to another folder"
            )

    samples: Iterable[Sample] = split.samples
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


# ---------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------


def _local_path(url: str) -> str | None:
    """The filesystem path of a local shard URL, or None for pipe:/http(s)/s3/... URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme in _REMOTE_SCHEMES or (len(parsed.scheme) > 1 and "://" in url):
        return None
    return os.path.expanduser(url)


def expand_urls(patterns: str | list[str]) -> list[str]:
    """Brace-expand shard patterns and check that local shards exist.

    Args:
        patterns: a pattern such as ``"data/train-{000000..000009}.tar"`` or a list of them.
            ``pipe:``, ``http(s)://`` and ``s3://`` URLs pass through unchecked.

    Returns:
        The expanded URLs in order, duplicates removed.

    Raises:
        KdpromptError: no URL at all, or local shards that do not exist (listing the first few).
    """
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(str(pattern)):
            if url not in urls:
                urls.append(url)
    if not urls:
        raise KdpromptError("no shard pattern given; set data.train/val/test to a shard pattern")
    missing = [u for u in urls if (p := _local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:_SHOW_MISSING])
        more = f" (and {len(missing) - _SHOW_MISSING} more)" if len(missing) > _SHOW_MISSING else ""
        raise KdpromptError(
            f"{len(missing)} of {len(urls)} shard(s) not found: {shown}{more}; check the pattern, "
            "or create shards with `kdprompt shards SRC OUT`"
        )
    return [u if _local_path(u) is None else os.path.expanduser(u) for u in urls]


def read_sizes(urls: list[str]) -> int | None:
    """Total number of samples in ``urls`` from the ``sizes.json`` beside each local shard.

    Returns:
        The total, or None when any shard is remote or not listed.
    """
    cache: dict[str, dict] = {}
    total = 0
    for url in urls:
        path = _local_path(url)
        if path is None:
            return None
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in cache:
            sizes_path = os.path.join(folder, SIZES_FILE)
            try:
                with open(sizes_path, encoding="utf-8") as f:
                    cache[folder] = json.load(f)
            except (OSError, ValueError):
                cache[folder] = {}
        if name not in cache[folder]:
            return None
        total += int(cache[folder][name])
    return total


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def batches_per_epoch_for(n_samples: int, batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch: ``n_samples // (batch_size * world_size)``, at least 1."""
    return max(1, n_samples // (batch_size * max(1, world_size)))


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else torch.distributed, else RANK/WORLD_SIZE, else 0/1."""
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def _warn_and_continue(exn: Exception) -> bool:
    # A shard that cannot be opened or is truncated: log it and go on with the next one.
    logger.warning("skipping unreadable shard data: %r", exn)
    return True


def _parse_label(sample: dict) -> int:
    if "cls" in sample:
        return int(sample["cls"].decode("utf-8").strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        label = meta.get("label") if isinstance(meta, dict) else None
        if label is not None:
            return int(label)
    return -1


def _decode(sample: dict) -> tuple[Image.Image, int, str]:
    """Decode one raw webdataset sample to (RGB image, label, text); raises on any defect."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"no image member (looked for {', '.join(IMAGE_KEYS)})")
    img = Image.open(io.BytesIO(sample[key]))
    img.load()
    text = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else ""
    return img.convert("RGB"), _parse_label(sample), text


class _ShardStream(torch.utils.data.IterableDataset):
    """The per-process stream of collated batches (one copy per DataLoader worker)."""

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        resampled: bool,
        batches_per_epoch: int | None,
        rank: int,
        world_size: int,
        drop_last: bool,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.batch_size = batch_size
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.resampled = resampled
        self.batches_per_epoch = batches_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last

    # -- shard level -------------------------------------------------------------------------

    def _pass_urls(self, pass_index: int, worker: int, num_workers: int) -> list[str]:
        # Same permutation on every rank (seeded without the rank), then split by node and worker:
        # ranks and workers read disjoint shard sets whose union is all shards.
        urls = list(self.urls)
        random.Random(f"shards:{self.seed}:{self.epoch}:{pass_index}").shuffle(urls)
        mine = list(islice(urls, self.rank, None, self.world_size))
        return list(islice(mine, worker, None, num_workers))

    def _raw_samples(
        self, worker: int, num_workers: int, mix: Callable[[Iterator[dict]], Iterator[dict]]
    ) -> Iterator[dict]:
        """Undecoded samples: one pass, repeated passes (batches_per_epoch), or resampled shards.

        ``mix`` shuffles a stream of samples. It is applied to each pass on its own, so the shuffle
        buffer never pulls a later pass's shards into this one: within a pass, ranks stay disjoint.
        """

        def read(urls: Iterable[str]) -> Iterator[dict]:
            return wds.tarfile_samples(({"url": u} for u in urls), handler=_warn_and_continue)

        where = f"rank {self.rank} worker {worker}"
        if self.resampled:
            # Per-rank (and per-worker) seed: ranks draw different shard sequences.
            rng = random.Random(f"resample:{self.seed}:{self.epoch}:{self.rank}:{worker}")

            def resampled() -> Iterator[dict]:
                tried: set[str] = set()
                productive = False
                while True:
                    url = rng.choice(self.urls)
                    for sample in read([url]):
                        productive = True
                        yield sample
                    tried.add(url)
                    if not productive and len(tried) == len(self.urls):
                        raise KdpromptError(
                            f"{where}: no readable samples in any of {len(self.urls)} shard(s)"
                        )

            yield from mix(resampled())
            return
        repeat = self.batches_per_epoch is not None
        pass_index = 0
        while True:
            urls = self._pass_urls(pass_index, worker, num_workers)
            count = 0
            for sample in mix(read(urls)):
                count += 1
                yield sample
            if not repeat:
                return
            if count == 0:
                # Repeating an empty stream would spin forever while the other ranks wait in DDP.
                raise KdpromptError(
                    f"{where}: its {len(urls)} shard(s) hold no readable samples ({', '.join(urls[:3])}); "
                    "check the shards or use fewer ranks/workers"
                )
            pass_index += 1

    # -- sample and batch level --------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota: int | None = None
        if self.batches_per_epoch is not None:
            # Split the rank's exact batch count over its workers; the DataLoader interleaves them.
            quota = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
            if quota == 0:
                return
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{self.rank}:{worker}")

        def mix(stream: Iterator[dict]) -> Iterator[dict]:
            # Shuffle the raw bytes (small) and decode afterwards, so the buffer holds no tensors.
            return wds.shuffle(self.shuffle_buffer, rng=rng)(stream) if self.shuffle_buffer > 1 else stream

        samples: Iterator[dict] = self._raw_samples(worker, num_workers, mix)

        corrupt = 0
        emitted = 0
        items: list[tuple[torch.Tensor, int, str, str, str]] = []

        def collate() -> dict:
            nonlocal corrupt, items
            images, labels, texts, keys, urls = zip(*items, strict=True)
            batch = {
                "image": torch.stack(list(images)),
                "label": torch.tensor(labels, dtype=torch.long),
                "text": list(texts),
                "key": list(keys),
                "url": list(urls),
                "corrupt": corrupt,
            }
            corrupt, items = 0, []
            return batch

        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            try:
                img, label, text = _decode(sample)
            except _DECODE_ERRORS as exc:
                corrupt += 1
                logger.warning("skipping corrupt sample %s in shard %s: %s", key, url, exc)
                continue
            items.append((self.transform(img), label, text, key, url))
            if len(items) == self.batch_size:
                yield collate()
                emitted += 1
                if quota is not None and emitted >= quota:
                    return
        if items and not self.drop_last:
            yield collate()
        elif corrupt:
            logger.warning(
                "rank %d worker %d: %d corrupt sample(s) after the last batch are not in any batch's count",
                self.rank,
                worker,
                corrupt,
            )


class ShardLoader:
    """Iterable of batch dicts streamed from webdataset shards; see :func:`make_loader`.

    Attributes:
        urls: all shard URLs (before node/worker splitting).
        batches_per_epoch: exact batches per iteration on every rank, or None (one pass / infinite).
    """

    def __init__(self, stream: _ShardStream, num_workers: int) -> None:
        self._stream = stream
        self.num_workers = num_workers

    @property
    def urls(self) -> list[str]:
        return self._stream.urls

    @property
    def batches_per_epoch(self) -> int | None:
        return self._stream.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard and sample shuffling for ``epoch`` (takes effect at the next iteration)."""
        self._stream.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return iter(self._stream)
        # batch_size=None: the stream already yields collated batches (and their corrupt counts).
        loader = wds.WebLoader(self._stream, batch_size=None, num_workers=self.num_workers, shuffle=False)
        return iter(loader)


def make_loader(
    urls: str | list[str],
    *,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor],
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    batches_per_epoch: int | None = None,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = True,
) -> ShardLoader:
    """Stream batches from webdataset shards, split over ranks and DataLoader workers.

    Each batch is ``{"image": FloatTensor (B,3,H,W), "label": LongTensor (B,) (-1 = unlabelled),
    "text": list[str], "key": list[str], "url": list[str], "corrupt": int}``; ``corrupt`` counts the
    samples skipped (missing/undecodable image) since the previous batch of the same worker, so its sum
    over batches is the total skipped. Shard and sample order depend only on (seed, epoch, rank,
    worker): equal arguments give identical batches with ``num_workers=0``.

    Do not pass the result through ``accelerator.prepare``: it would dispatch or shard it a second
    time. Sharding happens here; move batches to the device yourself.

    Args:
        urls: shard pattern(s), see :func:`expand_urls`.
        batch_size: samples per batch (per rank).
        transform: PIL RGB image -> (3,H,W) tensor.
        shuffle_buffer: sample shuffle buffer size (<= 1 disables sample shuffling).
        seed: base seed of shard and sample shuffling.
        epoch: epoch mixed into the seeds (see also :meth:`ShardLoader.set_epoch`).
        resampled: draw shards with replacement forever (per-rank seed) instead of splitting them;
            without ``batches_per_epoch`` the stream is then infinite.
        batches_per_epoch: if given, every rank yields exactly this many batches per iteration,
            repeating its shards as needed (see :func:`batches_per_epoch_for`).
        num_workers: DataLoader worker processes (0 = in-process).
        rank: this process's rank; default from torch.distributed, else RANK, else 0.
        world_size: number of ranks; default from torch.distributed, else WORLD_SIZE, else 1.
        drop_last: drop the last partial batch of each worker.

    Returns:
        A re-iterable :class:`ShardLoader`.

    Raises:
        KdpromptError: missing shards, or fewer shards than ranks x workers without ``resampled``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    url_list = expand_urls(urls)
    rank, world_size = _dist_info(rank, world_size)
    readers = world_size * max(1, num_workers)
    if not resampled and len(url_list) < readers:
        raise KdpromptError(
            f"{len(url_list)} shard(s) cannot be split over {world_size} rank(s) x {max(1, num_workers)} "
            f"worker(s) = {readers} readers: some would get no data; write at least {readers} shards "
            "(e.g. `kdprompt shards ... --maxcount` with a smaller count), use fewer workers, "
            "or stream with resampled: true"
        )
    stream = _ShardStream(
        url_list,
        batch_size=batch_size,
        transform=transform,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        resampled=resampled,
        batches_per_epoch=batches_per_epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    return ShardLoader(stream, num_workers)


# ---------------------------------------------------------------------------------------------
# Small labelled splits in memory
# ---------------------------------------------------------------------------------------------


def _read_classnames_file(path: Path) -> list[str]:
    if not path.is_file():
        raise KdpromptError(f"class names file not found: {path} (data.classnames)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise KdpromptError(f"class names file {path} is not valid JSON: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise KdpromptError(f"class names file {path} must hold a JSON list of strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


@SOURCES.register("shards")
def load_shards_split(cfg: ShardsData, split: str) -> Split:
    """Read every sample of one split's shards into memory (for small labelled splits).

    Samples carry the encoded image bytes and the shard key. Class names come from
    ``cfg.classnames``, else ``classnames.json`` beside the first shard, else the samples' json
    ``classname`` fields. Corrupt samples are skipped with a warning and counted in
    ``split.meta["corrupt"]``.

    Raises:
        KdpromptError: no pattern for ``split``, missing shards, unlabelled samples, or labels
            without a class name.
    """
    patterns = getattr(cfg, split, None)
    if not patterns:
        raise KdpromptError(f"data.{split} is not set: give a shard pattern for the {split} split")
    urls = expand_urls(patterns)

    raw: list[tuple[bytes, int, str | None, str, str | None]] = []  # image, label, caption, key, json name
    corrupt = 0
    for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=_warn_and_continue):
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            _, label, _ = _decode(sample)
            meta = json.loads(sample["json"]) if "json" in sample else {}
            meta = meta if isinstance(meta, dict) else {}
        except _DECODE_ERRORS as exc:
            corrupt += 1
            logger.warning("skipping corrupt sample %s in shard %s: %s", key, url, exc)
            continue
        if label < 0:
            raise KdpromptError(
                f"sample {key} in {url} has no label (no .cls member, no json 'label'); "
                f"data.{split} must point at labelled shards"
            )
        image_key = next(k for k in IMAGE_KEYS if k in sample)
        caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
        raw.append((sample[image_key], label, caption, key, meta.get("classname")))
    if corrupt:
        logger.warning("%d corrupt sample(s) skipped in the %s shards", corrupt, split)

    if cfg.classnames is not None:
        classnames = _read_classnames_file(Path(cfg.classnames))
    elif (first := _local_path(urls[0])) is not None and (Path(first).parent / CLASSNAMES_FILE).is_file():
        classnames = _read_classnames_file(Path(first).parent / CLASSNAMES_FILE)
    else:
        by_label: dict[int, str] = {}
        for _, label, _, _, name in raw:
            if name is not None:
                by_label.setdefault(label, name)
        n = max((label for _, label, *_ in raw), default=-1) + 1
        missing = [i for i in range(n) if i not in by_label]
        if missing:
            raise KdpromptError(
                f"no class names for label(s) {missing[:10]} of data.{split}: set data.classnames "
                f"or put {CLASSNAMES_FILE} beside the shards"
            )
        classnames = [by_label[i] for i in range(n)]

    bad = sorted({label for _, label, *_ in raw if label >= len(classnames)})
    if bad:
        raise KdpromptError(
            f"data.{split} has label(s) {bad[:10]} but only {len(classnames)} class names are known"
        )
    samples = [
        Sample(image=img, label=label, classname=classnames[label], caption=caption, key=key)
        for img, label, caption, key, _ in raw
    ]
    return Split(samples, classnames, name=split, meta={"corrupt": corrupt, "shards": len(urls)})


__all__ = [
    "CLASSNAMES_FILE",
    "IMAGE_KEYS",
    "SIZES_FILE",
    "ShardLoader",
    "batches_per_epoch_for",
    "expand_urls",
    "load_shards_split",
    "make_loader",
    "read_sizes",
    "write_shards",
]
