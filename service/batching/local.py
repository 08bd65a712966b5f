"""The in-process model backend: one model thread in the front-end's own process.

`LEVIT_INSTANCE_KIND=thread`: the single-process server (tests that steer the model thread with a
hook, debugging, the smallest deployments). Same contract as `RemoteModel`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from service.batching.batcher import Batcher, Hook, model_thread
from service.runtime import ModelRuntime
from service.settings import Settings


class LocalModel:
    def __init__(self, settings: Settings, before_forward: Hook | None = None) -> None:
        self.settings = settings
        self._before_forward = before_forward
        self._thread = model_thread()
        self.runtime: ModelRuntime | None = None
        self.batcher: Batcher | None = None
        self._unqueued = 0  # admitted images being decoded or uploaded (only the event loop writes it)

    async def start(self, on_available: Callable[[bool], None]) -> dict[str, Any]:
        """Load and warm in the model thread (the one that will run every batch), then start batching."""
        loop = asyncio.get_running_loop()
        self.runtime = await loop.run_in_executor(self._thread, ModelRuntime.warm, self.settings)
        s = self.settings
        self.batcher = Batcher(
            self.runtime.engine,
            s.max_batch_size,
            s.max_batch_delay_ms / 1000,
            s.max_queue,
            self._thread,
            before_forward=self._before_forward,
        )
        self.batcher.start()
        on_available(True)
        return self.runtime.describe()

    @property
    def queued(self) -> int:
        return self.batcher.queued if self.batcher is not None else 0

    @property
    def admitted(self) -> int:
        """Images admitted and not yet taken by the model thread: queued, being decoded, or (one per request)
        still being uploaded."""
        return self.queued + self._unqueued

    def uploading(self, delta: int) -> None:
        self._unqueued += delta

    @contextlib.contextmanager
    def decoding(self, count: int) -> Iterator[None]:
        """Counted for admission only: the model thread's batcher waits by its delay alone."""
        self._unqueued += count
        try:
            yield
        finally:
            self._unqueued -= count

    async def classify(self, images: list[np.ndarray], deadline: float) -> list[np.ndarray]:
        assert self.batcher is not None, "classify before start"
        probs = await self.batcher.classify([torch.from_numpy(image) for image in images], deadline)
        return [p.numpy() for p in probs]

    async def drain(self, timeout: float) -> bool:
        return self.batcher is None or await self.batcher.drain(timeout)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self._thread.shutdown(wait=False, cancel_futures=True)
