"""Model-only throughput of N processes x T threads: the ceiling a CPU server's model instances can reach.

    python -m bench.instances [--grid 1x16,2x8,4x4,8x2] [--batch 16] [--seconds 4] [--model LeViT_128S]

Issue 11's many-core floor compares the server with the *best* such configuration measured in the same run:
LeViT is too small for a wide OpenMP team (on 16 cores, 4 processes x 4 threads ran it 1.8x faster than one
process of 16), so "model only" on a big machine means several processes, and which split is best depends on
the CPU. Each process loads the server's engine (the same artifacts, found in the server's artifact folders,
with the linears the server picked), runs one batch size back to back, and is pinned to its own T cores
where the grid fits the machine (a ceiling: nothing else competes for them). All start together after a
barrier and run the same window; the figure is the sum of their images/s. Two ways it is a ceiling rather than
the server's exact setup: OpenMP waits as libgomp does by default (the server's model processes spin briefly,
`LEVIT_THREAD_POLICY`), and every shape runs the one batch size given (`bench.server` passes the best batch of
one process with all the threads; it is not searched per shape).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.timing import all_cores

if TYPE_CHECKING:
    from model.engine import Engine

START_TIMEOUT_S = 600.0  # every process loads (or, on a cold cache, builds) the engine before the barrier


@dataclass(frozen=True)
class Shape:
    """N model processes of T intra-op threads each (Triton's instance group on CPU)."""

    processes: int
    threads: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        n, _, t = text.strip().lower().partition("x")
        if not (n.isdigit() and t.isdigit()) or int(n) < 1 or int(t) < 1:
            raise ValueError(f"a shape is PROCESSESxTHREADS, both >= 1 (e.g. 4x4), got {text!r}")
        return cls(int(n), int(t))

    def __str__(self) -> str:
        return f"{self.processes}x{self.threads}"


@dataclass(frozen=True)
class EngineSpec:
    """The server's engine, rebuilt outside it: same variant (random weights), kind, buckets, linears and dtype,
    from the server's artifact folders, so it finds the server's artifacts instead of compiling its own.
    `bench.server.ModelOnly` builds it in the benchmark's process, each process of a shape here in its own."""

    model: str = "LeViT_128S"
    engine: str = "auto"
    max_batch_size: int = 16
    linears: str = "auto"  # what the server picked (its /v1/model); anything but onednn/mkl lets the engine pick
    dtype: str = "float32"

    def build(self, device: str = "cpu") -> Engine:
        import torch

        from model.engine import Engine
        from model.fuse import fuse
        from model.loader import random_model
        from service.settings import Settings

        return Engine(
            fuse(random_model(self.model)),
            self.engine,
            self.max_batch_size,
            device=device,
            dtype=getattr(torch, self.dtype),
            linears=self.linears if self.linears in ("onednn", "mkl") else "auto",
            artifact_dirs=Settings().engine_dirs,
        )


def parse_grid(text: str) -> list[Shape]:
    """`1x16,2x8,4x4` as shapes, in the order given (the order they are measured in)."""
    return [Shape.parse(item) for item in text.split(",") if item.strip()]


def default_grid(cores: int) -> list[Shape]:
    """Every power-of-two split of the machine's cores (1 x cores ... cores x 1)."""
    shapes, threads = [], cores
    while threads >= 1:
        shapes.append(Shape(cores // threads, threads))
        threads //= 2
    return shapes


def _worker(spec: EngineSpec, threads: int, cores: tuple[int, ...] | None, batch: int, seconds: float,
            barrier: mp.synchronize.Barrier, results: mp.queues.Queue) -> None:  # fmt: skip
    if cores:
        os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(threads)
    engine = spec.build()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(3):
            engine(x)
        barrier.wait(timeout=START_TIMEOUT_S)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            engine(x)
            calls += 1
    results.put(calls * batch / elapsed)


class GridError(RuntimeError):
    """A process of a shape died or never reported: the shape has no figure (its log says why)."""


def measure(shape: Shape, spec: EngineSpec, batch: int, seconds: float) -> float:
    """Images/s of `shape.processes` processes running `batch` at once, each on `shape.threads` threads.

    Raises GridError as soon as one process exits without its figure (a bad spec, an engine that cannot load):
    the others are released from the barrier and stopped rather than left waiting for it.
    """
    cpus = sorted(os.sched_getaffinity(0))
    pinned = shape.processes * shape.threads <= len(cpus)
    if not pinned:
        print(f"  {shape}: more threads than the {len(cpus)} cores, so not pinned", flush=True)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(shape.processes), ctx.Queue()
    procs = []
    for i in range(shape.processes):
        cores = tuple(cpus[i * shape.threads : (i + 1) * shape.threads]) if pinned else None
        args = (spec, shape.threads, cores, batch, seconds, barrier, results)
        procs.append(ctx.Process(target=_worker, args=args, name=f"model-only-{shape}-{i}", daemon=True))
    for proc in procs:
        proc.start()
    figures: list[float] = []
    deadline = time.monotonic() + START_TIMEOUT_S + 2 * seconds
    try:
        while len(figures) < len(procs):
            try:
                figures.append(results.get(timeout=1.0))
                continue
            except queue.Empty:
                pass
            dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise GridError(f"{shape}: model-only process {dead[0][0]} exited with {dead[0][1]}")
            if time.monotonic() > deadline:
                raise GridError(f"{shape}: {len(procs) - len(figures)} process(es) reported nothing in time")
        return sum(figures)
    finally:
        barrier.abort()  # a process still waiting there gets BrokenBarrierError and exits
        for proc in procs:
            proc.join(timeout=5 if figures else 1)
            if proc.is_alive():
                proc.kill()


def measure_grid(shapes: list[Shape], spec: EngineSpec, batch: int, seconds: float) -> dict[str, float]:
    """Images/s per shape, measured one shape at a time (never two shapes on the cores at once); a shape whose
    processes failed is reported and left out, so one bad shape does not cost a device run the others."""
    grid = {}
    for shape in shapes:
        try:
            grid[str(shape)] = measure(shape, spec, batch, seconds)
        except GridError as error:
            print(f"  model-only grid: {error}; left out", flush=True)
    return grid


def best(grid: dict[str, float]) -> tuple[str, float]:
    """The fastest shape and its images/s: the divisor of the many-core floor."""
    name = max(grid, key=grid.__getitem__)
    return name, grid[name]


def describe(grid: dict[str, float]) -> str:
    """One line for the benchmark's log: every shape's figure, then the best."""
    name, top = best(grid)
    return ", ".join(f"{k} {v:.1f}" for k, v in grid.items()) + f" img/s; best {name} ({top:.1f} img/s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=None, help="e.g. 1x16,2x8,4x4 (default: every power-of-two split)")
    parser.add_argument("--model", default="LeViT_128S")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=None, help="batch size each process runs (default: max)")
    parser.add_argument("--linears", default="auto", choices=("auto", "onednn", "mkl"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    shapes = parse_grid(args.grid) if args.grid else default_grid(all_cores())
    spec = EngineSpec(args.model, args.engine, args.max_batch_size, args.linears, args.dtype)
    batch = args.batch or args.max_batch_size
    print(f"{args.model}, engine {args.engine}, batch {batch}, {all_cores()} cores; processes x threads:", flush=True)
    grid = {}
    for shape in shapes:
        grid[str(shape)] = measure(shape, spec, batch, args.seconds)
        print(f"  {shape}: {grid[str(shape)]:.1f} img/s", flush=True)
    print(describe(grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
