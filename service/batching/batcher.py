"""The dynamic batcher every protocol shares: one bounded queue of images, one model thread.

Batches are formed on the event loop (cheap bookkeeping only) and run in a dedicated thread, so the
loop keeps accepting and decoding requests while the model computes. While the model is busy the
next batch collects images until it is full or `max_batch_delay` has passed since its first image;
an idle model never waits. Expired and cancelled images are dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from model.transforms import batch_input
from service import metrics
from service.errors import DeadlineExceeded, Draining, ModelFailure, QueueFull
from service.threads import named_pool

log = logging.getLogger(__name__)
BatchFn = Callable[[torch.Tensor], torch.Tensor]
Hook = Callable[[int], None]


def model_thread() -> ThreadPoolExecutor:
    """The one thread that builds, warms and runs the model.

    OpenMP gives every thread that opens a parallel region its own team of workers, and libgomp stops its
    workers spinning between regions once the process holds more of them than cores. LeViT runs hundreds
    of small parallel ops per batch, so one extra team (left by a loader or warm-up thread) makes every op
    wait for a futex wake-up: 2.6x slower at batch 1 on 2 cores (docs/benchmarks.md). All model work in
    one thread keeps one team.
    """
    return named_pool("levit-model", 1)


@dataclass(eq=False)
class _Item:
    tensor: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    drop_reason: str = "cancelled"


class Batcher:
    """`classify()` takes cropped images (`batch_input`'s forms) and returns their class probabilities, in order."""

    def __init__(
        self,
        run_batch: BatchFn,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue: int,
        model_thread: ThreadPoolExecutor,
        before_forward: Hook | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self._before_forward = before_forward  # test hook: set only from Python, never from config
        self._queue: deque[_Item] = deque()
        self._pending: list[_Item] = []  # the batch being formed while the model is busy
        self._model_thread = model_thread  # the one thread that has built the engine: see `model_thread()`
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._former: asyncio.Task[None] | None = None
        self._running: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Images waiting for the model: in the queue or in the batch being formed."""
        return len(self._queue) + len(self._pending)

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def start(self) -> None:
        self._former = asyncio.get_running_loop().create_task(self._form_batches(), name="levit-batcher")

    async def classify(self, tensors: list[torch.Tensor], deadline: float) -> list[torch.Tensor]:
        """`deadline` is a `time.monotonic()` instant; raises the ServiceError the protocols translate."""
        if self._closing:
            raise Draining("server is shutting down; retry on another replica")
        if self.queued + len(tensors) > self.max_queue:
            raise QueueFull(f"queue full ({self.queued} of {self.max_queue} images waiting); retry later")
        loop = asyncio.get_running_loop()
        items = [_Item(t, loop.create_future(), deadline) for t in tensors]
        self._queue.extend(items)
        metrics.QUEUE_DEPTH.set(self.queued)
        self._wake.set()
        try:
            _, pending = await asyncio.wait([i.future for i in items], timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            self._abandon(items, "cancelled")
            raise
        if pending or any(i.future.cancelled() for i in items):  # the former cancels images it finds expired
            self._abandon(items, "deadline")
            raise DeadlineExceeded("request deadline passed before its images were classified")
        return [i.future.result() for i in items]

    @staticmethod
    def _abandon(items: list[_Item], reason: str) -> None:
        for item in items:
            if not item.future.done():
                item.drop_reason = reason
                item.future.cancel()

    def _take(self, limit: int) -> list[_Item]:
        """Pop up to `limit` live images; expired or abandoned ones are dropped and counted here."""
        taken: list[_Item] = []
        now = time.monotonic()
        while self._queue and len(taken) < limit:
            item = self._queue.popleft()
            if not item.future.done() and item.deadline <= now:
                item.drop_reason = "deadline"
                item.future.cancel()
            if item.future.done():
                metrics.IMAGES_DROPPED.labels(item.drop_reason).inc()
                continue
            taken.append(item)
        return taken

    async def _wait(self, timeout: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _form_batches(self) -> None:
        while True:
            if not self._queue:
                await self._wait(None)
                continue
            self._pending = self._take(self.max_batch_size)
            if not self._pending:
                continue
            close_at = self._pending[0].enqueued + self.max_batch_delay_s
            while self.busy and len(self._pending) < self.max_batch_size and time.monotonic() < close_at:
                await self._wait(close_at - time.monotonic())
                self._pending += self._take(self.max_batch_size - len(self._pending))
            await self._idle.wait()
            batch, self._pending = self._pending, []
            metrics.QUEUE_DEPTH.set(self.queued)
            live = [i for i in batch if not i.future.done()]
            for item in batch:
                if item.future.done():
                    metrics.IMAGES_DROPPED.labels(item.drop_reason).inc()
            if live:
                self._idle.clear()
                self._running = asyncio.get_running_loop().create_task(self._dispatch(live))

    def _forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Runs in the model thread."""
        if self._before_forward is not None:
            self._before_forward(len(tensors))
        start = time.perf_counter()
        probs = self._run_batch(batch_input(tensors)).softmax(dim=-1).cpu()  # off a GPU in the model thread
        metrics.MODEL_FORWARD.observe(time.perf_counter() - start)
        return probs

    async def _dispatch(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        for item in batch:
            metrics.QUEUE_WAIT.observe(now - item.enqueued)
        metrics.BATCH_SIZE.observe(len(batch))
        try:
            loop = asyncio.get_running_loop()
            probs = await loop.run_in_executor(self._model_thread, self._forward, [i.tensor for i in batch])
        except Exception as error:
            log.exception("model failed on a batch of %d images", len(batch))
            failure = ModelFailure(f"model failed on this batch: {type(error).__name__}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
        else:
            metrics.IMAGES_CLASSIFIED.inc(len(batch))
            for item, row in zip(batch, probs):
                if not item.future.done():
                    item.future.set_result(row)
        finally:
            self._idle.set()
            self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, finish what is queued or running; True if everything finished in time."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while (self.queued or self.busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.queued and not self.busy

    async def close(self) -> None:
        if self._former is not None:
            self._former.cancel()
