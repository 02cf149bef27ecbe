"""Reading webdataset shards: batches streamed over ranks and DataLoader workers, samples decoded.

Layout: :mod:`~kdprompt.data.shard_format`; URLs and sizes: :mod:`~kdprompt.data.shard_urls`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
import webdataset as wds
from PIL import Image

from kdprompt.data.shard_format import DECODE_ERRORS, IMAGE_KEYS
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


def decode_sample(sample: dict) -> tuple[Image.Image, int, str]:
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
            return wds.tarfile_samples(({"url": u} for u in urls), handler=skip_unreadable_shard)

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
    interleave: int = 16,
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
        interleave: shards each worker reads at once, round-robin, ahead of the shuffle buffer (1: one
            after the other); mixes the classes of shards written in split order.
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
    return ShardLoader(stream, num_workers)


__all__ = [
    "ShardLoader",
    "batches_per_epoch_for",
    "decode_sample",
    "make_loader",
    "round_robin",
    "skip_unreadable_shard",
]
