"""The front-end side of the ring: hand crops to the model processes, await their probabilities.

Same contract as the in-process `Batcher` (`classify`, `queued`, `drain`, `close`): every protocol
goes through `Service`, which does not know which one it holds. The queue bound is global (the
task pipe's unread bytes, shared by all front-ends), deadlines and cancellations reach the model
processes through the slot's `cancelled` flag and the record's deadline, and the death of a model
process fails exactly the images it had taken, within one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import metrics
from service.batching.ring import (
    DROPPED_CANCELLED,
    DROPPED_DEADLINE,
    FAILED,
    OK,
    QUEUED,
    RESULT,
    TAKEN,
    TASK,
    Pipes,
    Ring,
    RingSpec,
    write_all,
)
from service.errors import DeadlineExceeded, Draining, ModelFailure, QueueFull

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often the ring's header (instance deaths, readiness) is read


@dataclass(eq=False)
class _Pending:
    gen: int
    future: asyncio.Future[np.ndarray]


class RemoteModel:
    """`Service`'s model backend when the model runs in other processes (`LEVIT_INSTANCE_KIND=process`)."""

    def __init__(self, ring_spec: RingSpec, pipes: Pipes, frontend: int, max_queue: int) -> None:
        self.ring = Ring(ring_spec, pipes)
        self.frontend = frontend
        self.max_queue = max_queue
        self._task_fd = pipes.task_w.fileno()
        self._result_fd = pipes.results[frontend][0].fileno()
        os.set_blocking(self._result_fd, False)
        self._pending: dict[int, _Pending] = {}
        self._orphans: set[int] = set()  # slots a previous process of this front-end left with a model
        self._epochs = self.ring.instance_epoch.copy()
        self._closing = False
        self._available: bool | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._buffer = b""
        metrics.before_read(lambda: metrics.QUEUE_DEPTH.set(self.queued))

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, on_available: Callable[[bool], None]) -> dict[str, Any]:
        """Wait until a model instance is ready; returns the model's description."""
        loop = asyncio.get_running_loop()
        self._adopt_orphans()
        loop.add_reader(self._result_fd, self._on_results)
        self._on_available = on_available
        self._watcher = loop.create_task(self._watch(), name="levit-ring-watch")
        while not self.ring.any_instance_ready() or self.ring.info() is None:
            await asyncio.sleep(POLL_S / 5)
        return self.ring.info() or {}

    def _adopt_orphans(self) -> None:
        """A restarted front-end takes over the slots its predecessor held (same front-end id), and its
        decoding and uploading counts (those requests died with it)."""
        ring = self.ring
        ring.decoding[self.frontend] = 0
        ring.uploading[self.frontend] = 0
        mine = np.flatnonzero(ring.holder == self.frontend)
        free = []
        for slot in mine.tolist():
            if ring.state[slot] in (QUEUED, TAKEN):
                ring.cancelled[slot] = 1  # a record will come back: free it then
                self._orphans.add(slot)
            else:
                free.append(slot)  # ALLOCATED (never sent) or DONE (answer read or lost with the process)
        if free:
            ring.release(free)
        if mine.size:
            log.warning("front-end %d: reclaimed %d slots of its previous process", self.frontend, mine.size)

    async def _watch(self) -> None:
        while True:
            ring = self.ring
            epochs = ring.instance_epoch.copy()
            for instance in np.flatnonzero(epochs != self._epochs).tolist():
                self._fail_taken_by(instance, int(epochs[instance]))
            self._epochs = epochs
            available = ring.any_instance_ready()
            if available != self._available:
                self._available = available
                self._on_available(available)
            await asyncio.sleep(POLL_S)

    def _fail_taken_by(self, instance: int, epoch: int) -> None:
        """Model process `instance` died: answer every image it had taken (it will never report them)."""
        ring = self.ring
        lost = [
            slot
            for slot in [*self._pending, *self._orphans]
            if ring.state[slot] == TAKEN and ring.owner[slot] == instance and ring.owner_epoch[slot] < epoch
        ]
        for slot in lost:
            self._finish(slot, FAILED, "model process exited while computing this image")
        if lost:
            log.error("model instance %d exited: %d images failed", instance, len(lost))

    @property
    def queued(self) -> int:
        return self.ring.queued()

    @property
    def admitted(self) -> int:
        """Images every front-end has admitted and no model process has taken: queued, being decoded, or (one
        per request) still being uploaded."""
        ring = self.ring
        return ring.queued() + ring.decoding_total() + ring.uploading_total()

    def uploading(self, delta: int) -> None:
        """Admitted requests of this front-end still being read: `Service.admission`. Only the event loop writes."""
        self.ring.uploading[self.frontend] += delta

    @contextlib.contextmanager
    def decoding(self, count: int) -> Iterator[None]:
        """`count` images of this front-end are being decoded: model processes may wait for them (see
        `Instance.gather`) rather than start a batch without them. Only the event loop writes this entry."""
        self.ring.decoding[self.frontend] += count
        try:
            yield
        finally:
            self.ring.decoding[self.frontend] -= count

    # --- requests --------------------------------------------------------------------------------------------

    async def classify(self, images: list[np.ndarray], deadline: float) -> list[np.ndarray]:
        if self._closing:
            raise Draining("server is shutting down; retry on another replica")
        queued = self.queued
        if queued + len(images) > self.max_queue:
            raise QueueFull(f"queue full ({queued} of {self.max_queue} images waiting); retry later")
        u8 = [t for t in images if t.dtype == np.uint8]
        f32 = [t for t in images if t.dtype != np.uint8]
        slots_u8 = self.ring.alloc(len(u8), False, self.frontend) if u8 else []
        slots_f32 = self.ring.alloc(len(f32), True, self.frontend) if f32 else []
        if slots_u8 is None or slots_f32 is None:
            self.ring.release((slots_u8 or []) + (slots_f32 or []))
            raise QueueFull("no free image slot (every slot is queued or computing); retry later")
        loop = asyncio.get_running_loop()
        it_u8, it_f32 = iter(slots_u8), iter(slots_f32)
        slots = [next(it_u8) if t.dtype == np.uint8 else next(it_f32) for t in images]
        enqueued = time.monotonic()
        records = []
        ring = self.ring
        for slot, image in zip(slots, images):
            ring.pixels(slot)[...] = image
            gen = int(ring.gen[slot])
            self._pending[slot] = _Pending(gen, loop.create_future())
            ring.state[slot] = QUEUED
            records.append(TASK.pack(slot, gen, self.frontend, 0, deadline, enqueued))
        write_all(self._task_fd, b"".join(records))
        futures = [self._pending[slot].future for slot in slots]
        try:
            _, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            self._abandon(slots)
            raise
        if pending or any(f.cancelled() for f in futures):
            self._abandon(slots)
            raise DeadlineExceeded("request deadline passed before its images were classified")
        return [f.result() for f in futures]

    def _abandon(self, slots: list[int]) -> None:
        """The client is gone or out of time: model processes skip these unless already computing them."""
        for slot in slots:
            entry = self._pending.get(slot)
            if entry is not None and not entry.future.done():
                self.ring.cancelled[slot] = 1
                entry.future.cancel()

    def _on_results(self) -> None:
        try:
            data = os.read(self._result_fd, 1 << 16)
        except BlockingIOError:
            return
        data = self._buffer + data
        whole = len(data) - len(data) % RESULT.size
        self._buffer = data[whole:]
        for slot, gen, status, _instance in RESULT.iter_unpack(data[:whole]):
            entry = self._pending.get(slot)
            if entry is not None and entry.gen == gen:
                self._finish(slot, status, "model failed on this batch")
            elif slot in self._orphans and self.ring.gen[slot] == gen:
                self._orphans.discard(slot)
                self.ring.release([slot])
            # else: a record about a slot recycled since (its front-end died and was replaced): ignore

    def _finish(self, slot: int, status: int, failure: str) -> None:
        entry = self._pending.pop(slot, None)
        self._orphans.discard(slot)
        ring = self.ring
        if entry is not None and not entry.future.done():
            if status == OK:
                entry.future.set_result(ring.probs[slot].copy())
            elif status == FAILED:
                entry.future.set_exception(ModelFailure(failure))
            elif status in (DROPPED_DEADLINE, DROPPED_CANCELLED):
                entry.future.cancel()
        ring.release([slot])

    async def drain(self, timeout: float) -> bool:
        """Refuse new work; wait for every answer this front-end is owed."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self._pending

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._result_fd)
