"""An asyncio micro-batcher: concurrent requests share one forward pass of the model.

Requests submit preprocessed images and await one future per image. A single worker task takes up to
``max_batch`` waiting images, or whatever arrived within ``max_wait_ms`` of the first, runs the model
on them in one dedicated thread (so torch is never called from several threads at once and the event
loop never blocks on it), and resolves the futures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from kdprompt.deploy import Prediction

log = logging.getLogger(__name__)

PredictFn = Callable[[Tensor, int, Sequence[str]], list[Prediction]]


class BatcherError(RuntimeError):
    """The model failed on a batch, or the batcher is not running; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Item:
    image: Tensor
    k: int
    source: str
    future: asyncio.Future[Prediction]


def truncate(prediction: Prediction, k: int) -> Prediction:
    """The top-``k`` of a top-k' prediction (k <= k'): top-k lists are sorted, so a prefix is exact."""
    return dataclasses.replace(
        prediction, labels=prediction.labels[:k], probs=prediction.probs[:k], indices=prediction.indices[:k]
    )


class MicroBatcher:
    """Collects images from concurrent requests into batches for ``predict``.

    Args:
        predict: ``(batch (B, 3, H, W), k, sources) -> list[Prediction]``, e.g. ``Bundle.predict_tensor``.
        max_batch: images per model call at most.
        max_wait_ms: how long the first waiting image may wait for others to join its batch.
        max_queue: images waiting at most; beyond it a request is refused at once with a 503, so an
            overloaded server sheds load instead of letting every request's latency grow.
    """

    def __init__(
        self, predict: PredictFn, *, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.predict = predict
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait = max_wait_ms / 1000.0
        self.batches = 0
        self.images = 0
        self._pending: collections.deque[_Item] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        """Whether the worker is started and alive."""
        return self._task is not None and not self._task.done()

    def stats(self) -> dict[str, int | float]:
        """Model calls and images served so far, and their mean batch size."""
        mean = self.images / self.batches if self.batches else 0.0
        return {"batches": self.batches, "images": self.images, "mean_batch": round(mean, 2)}

    async def start(self) -> None:
        """Start the worker task and the model thread (call from the serving event loop)."""
        if self.running:
            return
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdprompt-model")
        self._task = asyncio.create_task(self._run(), name="kdprompt-batcher")

    async def stop(self) -> None:
        """Stop the worker; images still waiting are answered with a 503 :class:`BatcherError`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail(list(self._pending), BatcherError("the server is shutting down; retry later", 503))
        self._pending.clear()
        if self._executor is not None:
            # Don't block the loop on a forward pass still running; the thread ends with it.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, images: Sequence[Tensor], k: int, sources: Sequence[str]) -> list[Prediction]:
        """Top-``k`` predictions of preprocessed (3, H, W) ``images``, batched with other requests' images.

        Raises:
            BatcherError: the batcher is not running or its queue is full (503), or the model failed on a
                batch holding these images (500).
        """
        if not self.running or self._wake is None:
            raise BatcherError("the model is not running (server starting or stopping); retry later", 503)
        if len(self._pending) + len(images) > self.max_queue:
            raise BatcherError(
                f"the server is busy ({len(self._pending)} images waiting, limit {self.max_queue}); "
                "retry in a moment",
                503,
            )
        loop = asyncio.get_running_loop()
        items = [
            _Item(image, k, source, loop.create_future())
            for image, source in zip(images, sources, strict=True)
        ]
        self._pending.extend(items)
        self._wake.set()
        try:
            # return_exceptions: wait for (and so retrieve) every future, even after one failed.
            results = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        except asyncio.CancelledError:
            # The request was cancelled (its client is gone): gather cancelled the futures, so the worker
            # skips them; drop them from the queue now, so they don't count against max_queue either.
            self._pending = collections.deque(item for item in self._pending if not item.future.done())
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    # ------------------------------------------------------------------------------------------ worker

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._process(batch)

    async def _next_batch(self) -> list[_Item]:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()
        deadline = loop.time() + self.max_wait
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # Waiting on an event (not on a queue get) cannot lose an item when the timeout fires.
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        # Skip images whose request was cancelled (client gone): they must not cost a model call.
        batch: list[_Item] = []
        while self._pending and len(batch) < self.max_batch:
            item = self._pending.popleft()
            if not item.future.done():
                batch.append(item)
        return batch

    async def _process(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        k = max(item.k for item in batch)
        sources = [item.source for item in batch]
        try:
            images = torch.stack([item.image for item in batch])
            predictions = await loop.run_in_executor(self._executor, self.predict, images, k, sources)
            if len(predictions) != len(batch):
                raise RuntimeError(f"predict returned {len(predictions)} predictions for {len(batch)} images")
        except asyncio.CancelledError:
            self._fail(batch, BatcherError("the server is shutting down; retry later", 503))
            raise
        except Exception as exc:
            log.exception("model call failed on a batch of %d images", len(batch))
            self._fail(batch, BatcherError(f"the model failed on a batch of {len(batch)} images: {exc!r}"))
            return
        self.batches += 1
        self.images += len(batch)
        for item, prediction in zip(batch, predictions, strict=True):
            if not item.future.done():
                item.future.set_result(truncate(prediction, item.k))

    @staticmethod
    def _fail(items: list[_Item], error: BatcherError) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
