"""Shared fixtures: real servers on free loopback ports, photos, and a gate to steer the model thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.server import Server
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "images"
PHOTO_NAMES = ("astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg")
_missing = [name for name in PHOTO_NAMES if not (PHOTOS / name).is_file()]
if _missing:  # a test without its data must fail, never pass on an empty loop
    raise FileNotFoundError(f"test photos missing from {PHOTOS}: {', '.join(_missing)}")


def photo(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


class Gate:
    """The model-thread test hook: records batch sizes, can hold batches back or make one fail."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.fail_next = False
        self.held = 0  # size of the batch currently waiting at the gate

    def close(self) -> None:
        self.open.clear()
        self.entered.clear()

    def __call__(self, batch_size: int) -> None:
        self.held = batch_size
        self.entered.set()
        if not self.open.wait(timeout=60):
            raise RuntimeError("gate never opened")
        self.sizes.append(batch_size)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected model failure")


class ServerThread:
    """`service.server.Server` in a background thread with its own event loop (hooks need in-process)."""

    def __init__(self, hook: Callable[[int], None] | None = None, **overrides) -> None:
        defaults = dict(
            weights="random",
            engine="eager",
            host="127.0.0.1",
            http_port=0,
            grpc_port=0,
            log_level="WARNING",
            instance_kind="thread",  # in this process: the hook steers the model thread
        )
        self.settings = Settings(**{**defaults, **overrides})
        self.hook = hook
        self.status: int | None = None
        self._created = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.server = Server(self.settings, before_forward=self.hook)
            self.loop = asyncio.get_running_loop()
            self._created.set()
            self.status = await self.server.run(handle_signals=False)

        asyncio.run(main())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def start(self, wait_ready: bool = True) -> ServerThread:
        self._thread.start()
        assert self._created.wait(30)
        if wait_ready:
            wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200)
        return self

    def stop(self, timeout: float = 60) -> int | None:
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "server did not stop"
        return self.status


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, interval: float = 0.01) -> None:
    """Poll with a generous ceiling: synchronises with the server, never a bet on timing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """One plain server per module, for tests that need no hook."""
    srv = ServerThread(max_batch_size=8, max_top_k=100).start()
    yield srv
    srv.stop()


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="session")
def engine_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the AOT artifact of what LEVIT_WEIGHTS=random serves (LeViT_128S, oneDNN linears).

    Built once per test run (the one real AOTInductor compilation of the suite, tens of seconds), so servers
    in tests can run the default engine with `engine_path=<this>, linears="onednn"` and start in seconds.
    """
    from model.engine import Engine
    from model.fuse import fuse
    from model.loader import random_model

    store = tmp_path_factory.mktemp("engines")
    engine = Engine(fuse(random_model("LeViT_128S")), "aot", 16, linears="onednn", artifact_dirs=[store])
    assert engine.artifact is not None and engine.artifact.origin == "built"
    return store
