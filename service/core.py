"""The protocol-independent service: readiness, decoding off the loop, batching, top-k.

HTTP and gRPC handlers are thin translations around `Service.classify`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service import metrics
from service.batching import Batcher
from service.batching.batcher import Hook, model_thread
from service.errors import BadRequest, Draining, NotReady, PayloadTooLarge, QueueFull
from service.imaging import ImageError, load_image_pixels
from service.results import ImageResult
from service.runtime import ModelRuntime, top_k
from service.settings import Settings
from service.threads import named_pool

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


class Service:
    def __init__(self, settings: Settings, before_forward: Hook | None = None) -> None:
        self.settings = settings
        self._phase = Phase.LOADING
        self._phase_listeners: list[Callable[[Phase], None]] = []
        self.runtime: ModelRuntime | None = None
        self.batcher: Batcher | None = None
        self._before_forward = before_forward
        self._inflight = 0  # admitted classify calls; drain waits for them
        self._model_thread = model_thread()
        self._decoders = named_pool("levit-decode", os.cpu_count() or 2)

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, value: Phase) -> None:
        self._phase = value
        for listener in self._phase_listeners:
            listener(value)

    def on_phase_change(self, listener: Callable[[Phase], None]) -> None:
        """Readiness followers (gRPC health) are told at once, and of the current phase now."""
        self._phase_listeners.append(listener)
        listener(self._phase)

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    async def start(self) -> None:
        """Load and warm the model off the loop; the HTTP server answers /healthz meanwhile."""
        loop = asyncio.get_running_loop()
        self.runtime = await loop.run_in_executor(self._model_thread, ModelRuntime.warm, self.settings)
        self.batcher = Batcher(
            self.runtime.engine,
            self.settings.max_batch_size,
            self.settings.max_batch_delay_ms / 1000,
            self.settings.max_queue,
            self._model_thread,
            before_forward=self._before_forward,
        )
        self.batcher.start()
        self.phase = Phase.READY
        log.info("ready")

    def deadline(self, timeout_ms: float | None) -> float:
        """Client-provided timeout, capped by nothing but sanity; the default comes from settings."""
        if timeout_ms is None:
            timeout_ms = self.settings.request_timeout_ms
        if timeout_ms <= 0:
            raise BadRequest(f"timeout must be positive, got {timeout_ms} ms")
        return time.monotonic() + timeout_ms / 1000

    def check_k(self, k: int | None) -> int:
        k = self.settings.top_k if k is None else k
        if not 1 <= k <= self.settings.max_top_k:
            raise BadRequest(f"k must be between 1 and {self.settings.max_top_k}, got {k}")
        return k

    def check_capacity(self) -> None:
        """The cheap admission check, before a request's body is even read: overload is refused in microseconds."""
        self._admit(1)

    def _admit(self, count: int) -> Batcher:
        if self.phase is Phase.DRAINING:
            raise Draining("server is shutting down; retry on another replica")
        if self.phase is not Phase.READY or self.batcher is None:
            raise NotReady("model is still loading; retry shortly")
        if count == 0:
            raise BadRequest("no image in the request")
        if count > self.settings.max_images_per_request:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {self.settings.max_images_per_request}")
        if self.batcher.queued + count > self.settings.max_queue:
            # Refuse before spending CPU on decoding work that cannot be queued anyway.
            raise QueueFull(f"queue full ({self.batcher.queued} of {self.settings.max_queue} images waiting)")
        return self.batcher

    def _decode(self, upload: Upload) -> torch.Tensor:
        start = time.perf_counter()
        tensor = load_image_pixels(
            upload.data,
            filename=upload.filename,
            max_pixels=self.settings.max_image_pixels,
            exact=self.settings.exact_resize,
        )
        metrics.PREPROCESS.observe(time.perf_counter() - start)
        return tensor

    async def preprocess(self, uploads: list[Upload]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._decoders, self._decode, u) for u in uploads)))

    async def probabilities(self, images: list[Upload] | list[torch.Tensor], deadline: float) -> list[torch.Tensor]:
        """Softmax `[1000]` per image, in order: encoded uploads are decoded first; tensors go straight in."""
        batcher = self._admit(len(images))
        self._inflight += 1
        try:
            tensors = await self.preprocess(images) if isinstance(images[0], Upload) else images
            return await batcher.classify(tensors, deadline)
        finally:
            self._inflight -= 1

    async def classify(self, uploads: list[Upload], k: int | None, deadline: float) -> list[ImageResult]:
        k = self.check_k(k)
        probs = await self.probabilities(uploads, deadline)
        return [ImageResult(u.filename, top_k(p, k)) for u, p in zip(uploads, probs)]

    async def drain(self, timeout: float) -> bool:
        """Refuse new work at once; let every admitted request finish, within `timeout` seconds."""
        self.phase = Phase.DRAINING
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        finished = self.batcher is None or await self.batcher.drain(max(0.0, deadline - time.monotonic()))
        if not finished or self._inflight:
            log.warning("drain timeout (%.1fs) reached with work still in flight", timeout)
            return False
        return True

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._decoders.shutdown(wait=False, cancel_futures=True)


__all__ = ["ImageError", "Phase", "Service", "Upload"]
