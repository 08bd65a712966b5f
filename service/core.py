"""The protocol-independent service: readiness, decoding off the loop, batching, top-k.

HTTP and gRPC handlers are thin translations around `Service.classify`. The model itself sits behind a
`ModelBackend`: a thread of this process (`LocalModel`) or model processes fed through shared memory
(`RemoteModel`); the protocols cannot tell which.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service import metrics
from service.errors import BadRequest, Draining, NotReady, PayloadTooLarge, QueueFull
from service.imaging import ImageError, load_image_array
from service.ranking import top_k
from service.results import ImageResult
from service.settings import Settings
from service.threads import named_pool

log = logging.getLogger(__name__)
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
_MILLISECONDS = re.compile(r"\s*[0-9]{1,12}\s*")


def timeout_header(value: str | None) -> int | None:
    """The X-Request-Timeout-Ms header (HTTP, /classify and /v2 alike), for `Service.deadline`: a positive
    number of milliseconds, or 400 bad_request."""
    if value is None:
        return None
    if not _MILLISECONDS.fullmatch(value) or int(value) < 1:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive integer (milliseconds), got {value[:40]!r}")
    return int(value)


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


class ModelBackend(Protocol):
    """Where batches are formed and run; `start` returns the model's description (`GET /v1/model`)."""

    @property
    def queued(self) -> int: ...

    @property
    def admitted(self) -> int: ...

    async def start(self, on_available: Callable[[bool], None]) -> dict[str, Any]: ...

    def decoding(self, count: int) -> contextlib.AbstractContextManager[None]: ...

    def uploading(self, delta: int) -> None: ...

    async def classify(self, images: list[np.ndarray], deadline: float) -> list[np.ndarray]:
        """Probabilities `[1000]` float32 per image. An image is a `[224, 224, 3]` uint8 crop, or an already
        normalised `[3, 224, 224]` float32 input (the v2 protocol's FP32 tensors): numpy, so that front-end
        processes never import torch."""
        ...

    async def drain(self, timeout: float) -> bool: ...

    async def close(self) -> None: ...


class Admission:
    """One admitted request's place in LEVIT_MAX_QUEUE while its body is read and parsed: one image, handed
    back when its images are counted as being decoded (`Service.probabilities`) or when the request ends.

    Why: admission that only checked let a surge through while the queue was nearly full; those requests
    read their uploads, then met the full queue at the count check and got their 503 after 50-100 ms
    (server-side median, 2 cores, `make test-stress`) instead of at once.
    """

    def __init__(self, model: ModelBackend) -> None:
        self._model: ModelBackend | None = model
        model.uploading(1)

    def release(self) -> None:
        if self._model is not None:
            self._model.uploading(-1)
            self._model = None


class Service:
    def __init__(self, settings: Settings, model: ModelBackend, decoders: int | None = None) -> None:
        self.settings = settings
        self._phase = Phase.LOADING
        self._phase_listeners: list[Callable[[Phase], None]] = []
        self.model = model
        self.model_info: dict[str, Any] | None = None  # `describe()` of the served model, once loaded
        self._started = False
        self._inflight = 0  # admitted classify calls; drain waits for them
        self._decoders = named_pool("levit-decode", decoders or os.cpu_count() or 2, settings.decode_priority)

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

    @property
    def weights_id(self) -> str:
        return self.model_info["weights"]["id"] if self.model_info else "unknown"

    async def start(self) -> None:
        """Load and warm the model (or wait for a model process); the HTTP server answers /healthz meanwhile."""
        self.model_info = await self.model.start(self._on_available)
        self._started = True
        self._on_available(True)
        log.info("ready")

    def _on_available(self, available: bool) -> None:
        """A model can serve (or none can, while a model process restarts): readiness follows."""
        if not self._started or self.phase in (Phase.DRAINING, Phase.FAILED):
            return
        phase = Phase.READY if available else Phase.LOADING
        if phase is not self.phase:
            if not available:
                log.warning("no model instance can serve: not ready until one is back")
            self.phase = phase

    def deadline(self, *timeouts_ms: float | None, stream: bool = False) -> float:
        """The one deadline constructor: a `time.monotonic()` instant.

        `timeouts_ms` are what the request asks for (the X-Request-Timeout-Ms header, a protocol's timeout
        parameter, the gRPC deadline; None where not given): the shortest wins; none given, the server's
        LEVIT_REQUEST_TIMEOUT_MS. A request on a stream (`stream`), whose own deadline bounds the whole stream,
        gets at most the server's default as well.
        """
        given = [timeout for timeout in timeouts_ms if timeout is not None]
        if stream or not given:
            given.append(self.settings.request_timeout_ms)
        return time.monotonic() + min(given) / 1000

    def check_k(self, k: int | None) -> int:
        k = self.settings.top_k if k is None else k
        if not 1 <= k <= self.settings.max_top_k:
            raise BadRequest(f"k must be between 1 and {self.settings.max_top_k}, got {k}")
        return k

    @contextlib.contextmanager
    def admission(self) -> Iterator[Admission]:
        """The one admission path, first in every protocol's request handler, before its body is read or
        parsed: overload, loading and draining are refused in microseconds, and an admitted request holds one
        image of the queue bound until `probabilities` counts its images (and checks them against the bound)."""
        admission = Admission(self._admit(1))
        try:
            yield admission
        finally:
            admission.release()

    def _admit(self, count: int) -> ModelBackend:
        if self.phase is Phase.DRAINING:
            raise Draining("server is shutting down; retry on another replica")
        if self.phase is not Phase.READY:
            raise NotReady("model is still loading; retry shortly")
        if count == 0:
            raise BadRequest("no image in the request")
        if count > self.settings.max_images_per_request:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {self.settings.max_images_per_request}")
        admitted = self.model.admitted
        if admitted + count > self.settings.max_queue:
            # Refuse before spending CPU on work that cannot be queued anyway. Images being decoded and requests
            # being uploaded count: with the queue alone, a surge was admitted, read and decoded behind earlier
            # work and refused after all, 50-750 ms later (`Admission`; docs/benchmarks.md).
            raise QueueFull(
                f"queue full ({admitted} of {self.settings.max_queue} images queued, decoding or uploading)"
            )
        return self.model

    def _decode(self, upload: Upload) -> np.ndarray:
        start = time.perf_counter()
        crop = load_image_array(
            upload.data,
            filename=upload.filename,
            max_pixels=self.settings.max_image_pixels,
            exact=self.settings.exact_resize,
        )
        metrics.PREPROCESS.observe(time.perf_counter() - start)
        return crop

    async def preprocess(self, uploads: list[Upload]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._decoders, self._decode, u) for u in uploads)))

    async def probabilities(
        self, images: list[Upload] | list[np.ndarray], deadline: float, admission: Admission | None = None
    ) -> list[np.ndarray]:
        """Softmax `[1000]` per image, in order: encoded uploads are decoded first; arrays go straight in.
        The request's `admission` gives its place back in the same step as its images are checked and counted."""
        if admission is not None:
            admission.release()
        batcher = self._admit(len(images))
        self._inflight += 1
        try:
            if isinstance(images[0], Upload):
                with batcher.decoding(len(images)):
                    arrays = await self.preprocess(images)
            else:
                arrays = images
            return await batcher.classify(arrays, deadline)
        finally:
            self._inflight -= 1

    async def classify(
        self, uploads: list[Upload], k: int | None, deadline: float, admission: Admission | None = None
    ) -> list[ImageResult]:
        k = self.check_k(k)
        probs = await self.probabilities(uploads, deadline, admission)
        return [ImageResult(u.filename, top_k(p, k)) for u, p in zip(uploads, probs)]

    async def drain(self, timeout: float) -> bool:
        """Refuse new work at once; let every admitted request finish, within `timeout` seconds."""
        self.phase = Phase.DRAINING
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        finished = await self.model.drain(max(0.0, deadline - time.monotonic()))
        if not finished or self._inflight:
            log.warning("drain timeout (%.1fs) reached with work still in flight", timeout)
            return False
        return True

    async def close(self) -> None:
        await self.model.close()
        self._decoders.shutdown(wait=False, cancel_futures=True)


__all__ = ["Admission", "ImageError", "Phase", "Service", "Upload"]
