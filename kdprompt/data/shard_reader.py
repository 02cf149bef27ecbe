"""Reading webdataset shards: batches streamed over ranks and DataLoader workers, samples decoded.

Layout: :mod:`~kdprompt.data.shard_format`; URLs and sizes: :mod:`~kdprompt.data.shard_urls`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys

from kdprompt.data.shard_format import DECODE_ERRORS, END_OF_ARCHIVE, IMAGE_KEYS, META_MEMBER
from kdprompt.data.shard_urls import expand_urls
from kdprompt.errors import KdpromptError

logger = logging.getLogger(__name__)


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


def round_robin(streams: Iterator[Iterator[dict]], width: int) -> Iterator[dict]:
    """One sample from each of ``width`` open streams in turn; a finished one is replaced by the next.

    Shards written in split order hold a few classes each; reading several at once, before the shuffle
    buffer, mixes them. Deterministic: the order depends only on the streams and ``width``.
    """
    active: deque[Iterator[dict]] = deque(islice(streams, max(1, width)))
    while active:
        stream = active.popleft()
        sample = next(stream, None)
        if sample is None:
            follower = next(streams, None)
            if follower is not None:
                active.append(follower)
            continue
        yield sample
        active.append(stream)


def skip_unreadable_shard(exn: Exception) -> bool:
    # A shard that cannot be opened, or a member webdataset cannot group: log it and go on.
    logger.warning("skipping unreadable shard data: %r", exn)
    return True


CUT = "__cut__"
"""Marks a sample that a shard cut short ends in (its members may be missing): decoded as corrupt."""
WORKER_ERROR = "__worker_error__"  # the item a data-loader worker sends instead of raising a user error
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _TailReader:
    """A read-only stream that remembers the last bytes read, to tell a whole tar from a cut one."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.tail = (self.tail + data[-len(END_OF_ARCHIVE) :])[-len(END_OF_ARCHIVE) :]
        return data

    def ends_whole(self) -> bool:
        """Read to the end; whether the stream ended with a tar's end-of-archive blocks."""
        while self.read(1 << 16):
            pass
        return self.tail == END_OF_ARCHIVE


def _members(tar: tarfile.TarFile, url: str, cut: list[str | None]) -> Iterator[dict]:
    """The files of an open tar stream as webdataset's file dicts; a read error ends them and records,
    in ``cut``, the name of the member being read (None between members)."""
    name: str | None = None
    try:
        for info in tar:
            name = info.name
            if info.isreg() and not META_MEMBER.match(name):
                member = tar.extractfile(info)
                assert member is not None  # a regular file
                yield {"fname": name, "data": member.read(), "__url__": url}
            tar.members = []  # stream mode: forget the headers read, keep memory flat
            name = None
    except _READ_ERRORS as exc:
        cut.append(name)
        logger.warning("shard %s is cut short (%s)", url, exc)


def _one_shard(url: str) -> Iterator[dict]:
    try:
        stream = _TailReader(gopen(url))
    except Exception as exn:  # as broad as webdataset's own opener: any unopenable shard is skipped
        skip_unreadable_shard(exn)
        return
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (its stream is closed below)
        except _READ_ERRORS as exn:
            skip_unreadable_shard(exn)
            return
        cut: list[str | None] = []
        last: dict | None = None
        for sample in group_by_keys(_members(tar, url, cut), handler=skip_unreadable_shard):
            if last is not None:
                yield last
            last = sample
        # A compressed tar cut short fails to decompress instead (a read error above).
        plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
        if not cut and plain and not stream.ends_whole():
            logger.warning("shard %s is cut short (no end-of-archive blocks)", url)
            cut.append(None)
        if cut:
            # The sample the cut fell in: the last one read, or (cut before any of its members was
            # read) one that left nothing but its member's name, or nothing at all.
            key = base_plus_ext(cut[0])[0] if cut[0] is not None else None
            if last is not None and key in (None, last["__key__"]):
                last[CUT] = True
            elif key is not None or last is None:
                if last is not None:
                    yield last
                last = {"__key__": key or "?", "__url__": url, CUT: True}
        if last is not None:
            yield last
    finally:
        try:
            stream.stream.close()
        except OSError as exn:  # a pipe: its command's exit status
            skip_unreadable_shard(exn)


def shard_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Raw webdataset samples (members grouped by key) of the shards ``urls``, one shard after another.

    Unlike ``webdataset.tarfile_samples``, no sample of a shard cut short (a killed write, a partial
    download) is lost unseen: the one the cut falls in is yielded marked :data:`CUT`, and
    :func:`decode_sample` rejects it, so readers skip it and count it as corrupt. A shard that cannot
    be opened at all is skipped with a warning.
    """
    for url in urls:
        yield from _one_shard(url)


def _parse_label(sample: dict) -> int:
    if "cls" in sample:
        return int(sample["cls"].decode("utf-8").strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        label = meta.get("label") if isinstance(meta, dict) else None
        if label is not None:
            return int(label)
    return -1


def decode_sample(sample: dict) -> tuple[Image.Image, int, str]:
    """Decode one raw webdataset sample to (RGB image, label, text); raises on any defect."""
    if sample.get(CUT):
        raise ValueError("the shard is cut short inside this sample")
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
        interleave: int,
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
        self.interleave = interleave
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

        ``interleave`` shards are read at once, round-robin; ``mix`` then shuffles the stream. Both
        apply to each pass on its own, so no later pass's shards are pulled into this one: within a pass,
        ranks stay disjoint.
        """

        def read(urls: Iterable[str]) -> Iterator[dict]:
            return shard_samples(urls)

        def interleaved(urls: Iterable[str]) -> Iterator[dict]:
            return round_robin((read([u]) for u in urls), self.interleave)

        where = f"rank {self.rank} worker {worker}"
        if self.resampled:
            # Per-rank (and per-worker) seed: ranks draw different shard sequences.
            rng = random.Random(f"resample:{self.seed}:{self.epoch}:{self.rank}:{worker}")

            tried: set[str] = set()
            productive = False

            def shard(url: str) -> Iterator[dict]:
                nonlocal productive
                for sample in read([url]):
                    productive = True
                    yield sample
                tried.add(url)
                if not productive and len(tried) == len(self.urls):
                    raise KdpromptError(f"{where}: no readable samples in any of {len(self.urls)} shard(s)")

            def draws() -> Iterator[Iterator[dict]]:
                while True:
                    yield shard(rng.choice(self.urls))

            yield from mix(round_robin(draws(), self.interleave))
            return
        repeat = self.batches_per_epoch is not None
        pass_index = 0
        while True:
            urls = self._pass_urls(pass_index, worker, num_workers)
            count = 0
            for sample in mix(interleaved(urls)):
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
        if torch.utils.data.get_worker_info() is None:
            yield from self._batches()
            return
        try:
            yield from self._batches()
        except KdpromptError as exc:
            # Raised here, torch would re-raise it in the main process with this worker's whole
            # traceback in its message; pass the one-line message on instead (traceback: debug log).
            logger.debug("data-loader worker failed", exc_info=True)
            yield {WORKER_ERROR: str(exc)}

    def _batches(self) -> Iterator[dict]:
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
                img, label, text = decode_sample(sample)
            except DECODE_ERRORS as exc:
                corrupt += 1
                logger.warning("skipping corrupt sample %s in shard %s: %s", key, url, exc)
                continue
            # A keyed transform (kdprompt.teacher_outputs.replay) replays a stored view of this sample.
            keyed = getattr(self.transform, "keyed", False)
            view = self.transform(img, key=key, url=url, epoch=self.epoch) if keyed else self.transform(img)
            items.append((view, label, text, key, url))
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

    def __init__(self, stream: _ShardStream, num_workers: int, pin_memory: bool = False) -> None:
        self._stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory

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
            if self.pin_memory:
                return (
                    {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
                    for b in self._stream
                )
            return iter(self._stream)
        # batch_size=None: the stream already yields collated batches (and their corrupt counts).
        loader = wds.WebLoader(
            self._stream,
            batch_size=None,
            num_workers=self.num_workers,
            shuffle=False,
            pin_memory=self.pin_memory,
        )
        return _raise_worker_errors(iter(loader))


def _raise_worker_errors(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        if WORKER_ERROR in batch:
            raise KdpromptError(batch[WORKER_ERROR])
        yield batch


def make_loader(
    urls: str | list[str],
    *,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor],
    shuffle_buffer: int = 1000,
    interleave: int = 16,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    batches_per_epoch: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
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
        interleave: shards each worker reads at once, round-robin, ahead of the shuffle buffer (1: one
            after the other); mixes the classes of shards written in split order.
        seed: base seed of shard and sample shuffling.
        epoch: epoch mixed into the seeds (see also :meth:`ShardLoader.set_epoch`).
        resampled: draw shards with replacement forever (per-rank seed) instead of splitting them;
            without ``batches_per_epoch`` the stream is then infinite.
        batches_per_epoch: if given, every rank yields exactly this many batches per iteration,
            repeating its shards as needed (see :func:`batches_per_epoch_for`).
        num_workers: DataLoader worker processes (0 = in-process).
        pin_memory: page-lock each batch's tensors (needs CUDA), so copies to the GPU can overlap compute.
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
    if interleave < 1:
        raise ValueError(f"interleave must be >= 1, got {interleave}")
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
        interleave=interleave,
        seed=seed,
        epoch=epoch,
        resampled=resampled,
        batches_per_epoch=batches_per_epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    return ShardLoader(stream, num_workers, pin_memory)


__all__ = [
    "CUT",
    "ShardLoader",
    "batches_per_epoch_for",
    "decode_sample",
    "make_loader",
    "round_robin",
    "shard_samples",
    "skip_unreadable_shard",
]
