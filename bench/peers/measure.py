"""One level (peer, payload set, concurrency) driven by bench.loadgen's `run_level`, plus what it lacks:
the server's CPU and the completed images over exactly the same measured window.

Throughput and CPU per image are taken from every response that *completes* inside the window, counted by a
thin wrapper around the driver (as `run_level` itself now counts), over exactly the window in which a task
running beside the clients reads the server's CPU (its whole process tree, from /proc) at both ends. The window
starts when the last virtual client has connected, as `run_level`'s does.

On a shared 2-core machine other processes distort everything (PyTorch's OpenMP threads spin at
barriers while a sibling is descheduled), so each level first waits for a quiet machine and reports
the CPU other processes used during its window (`other_cores`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.loadgen import Client, Driver, LevelResult, run_level
from bench.timing import Foreign, own_cpu_seconds, wait_quiet


@dataclass
class Level:
    peer: str
    payloads: str
    concurrency: int
    round: int
    window_s: float  # measured window, seconds
    completed: int  # responses that completed inside the window
    cpu_s: float  # server CPU seconds (process tree) inside the window
    other_cores: float  # CPU of processes other than the server and this benchmark in the window, in cores
    waited_s: float  # how long the level waited for a quiet machine first
    result: LevelResult  # latencies, errors (bench.loadgen)

    @property
    def images_per_s(self) -> float:
        return self.completed / self.window_s if self.window_s else 0.0

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_s / self.completed if self.completed else float("nan")

    @property
    def errors(self) -> int:
        return self.result.errors


@dataclass
class _Window:
    concurrency: int
    connected: int = 0
    start: float = 0.0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    completions: list[float] = field(default_factory=list)


class _MeteredClient:
    def __init__(self, inner: Client, window: _Window) -> None:
        self.inner, self.window = inner, window

    async def call(self, index: int) -> None:
        await self.inner.call(index)
        self.window.completions.append(time.perf_counter())

    async def close(self) -> None:
        await self.inner.close()


class _MeteredDriver:
    """The driver `run_level` gets: it notes when the last client connected and when each call completed."""

    def __init__(self, inner: Driver, window: _Window) -> None:
        self.inner, self.window, self.name = inner, window, inner.name

    async def connect(self) -> Client:
        client = await self.inner.connect()
        self.window.connected += 1
        if self.window.connected == self.window.concurrency:
            self.window.start = time.perf_counter()
            self.window.started.set()
        return _MeteredClient(client, self.window)


async def _cpu_over_window(
    window: _Window, server_cpu: Callable[[], float], warmup: float, duration: float
) -> tuple[float, float, float, float]:
    """(server CPU seconds, other processes' cores, window start, window end), read at the window's ends."""
    await window.started.wait()
    await asyncio.sleep(max(0.0, window.start + warmup - time.perf_counter()))
    cpu0, t0 = server_cpu(), time.perf_counter()
    with Foreign(lambda: own_cpu_seconds() + server_cpu()) as foreign:
        await asyncio.sleep(max(0.0, t0 + duration - time.perf_counter()))
    return server_cpu() - cpu0, foreign.cores, t0, time.perf_counter()


async def measure_level(
    peer: str,
    driver: Driver,
    count: int,
    concurrency: int,
    warmup: float,
    duration: float,
    server_cpu: Callable[[], float],
    label: str,
    round_index: int,
    quiet_timeout: float = 60.0,
    quiet_cores: float = 0.25,
) -> Level:
    """Closed loop: `concurrency` clients over `count` payloads; `warmup` seconds discarded, then `duration`."""

    def ours() -> float:  # this benchmark and the (idle) server: what is not "other processes"
        return own_cpu_seconds() + server_cpu()

    # nothing else runs on this event loop yet: waiting blocks it harmlessly
    waited = wait_quiet(quiet_cores, timeout=quiet_timeout, own=ours) if quiet_timeout > 0 else 0.0
    window = _Window(concurrency)
    sampler = asyncio.create_task(_cpu_over_window(window, server_cpu, warmup, duration))
    try:
        result = await run_level(_MeteredDriver(driver, window), count, concurrency, warmup, duration, label=label)
    except BaseException:
        sampler.cancel()
        raise
    cpu_s, other, t0, t1 = await sampler
    completed = sum(1 for t in window.completions if t0 <= t <= t1)
    return Level(peer, label, concurrency, round_index, t1 - t0, completed, cpu_s, other, waited, result)
