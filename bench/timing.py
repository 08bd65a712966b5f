"""Timing helpers shared by the benchmarks: robust to a noisy, shared 2-core machine.

Other processes only ever make a call slower, never faster, and on 2 cores one busy neighbour can
stall a 2-thread OpenMP region for a whole time slice, so per-call times have a long right tail
whose size depends on what else runs. Benchmarks therefore time *blocks* of back-to-back calls,
repeat them in interleaved rounds (every path once per round), pool the per-call times, and report a
low percentile (`FAST_QUANTILE`) of the pool: the speed the path reaches whenever the machine lets
it, which is what ratios between paths should compare.
"""

from __future__ import annotations

import ctypes
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def all_cores() -> int:
    return len(os.sched_getaffinity(0))


FAST_QUANTILE = 0.2


def time_block(fn: Callable[[], Any], min_time: float, min_calls: int = 3) -> list[float]:
    """Seconds per call of `fn`, for a block of at least `min_calls` calls and `min_time` seconds."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def fast(times: list[float], q: float = FAST_QUANTILE) -> float:
    """The `q` quantile of per-call times (nearest rank): the path's speed when the machine lets it run."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def matmul_gflops(threads: int, size: int = 2048, min_time: float = 0.3, onednn: bool = False) -> float:
    """Achieved fp32 GFLOP/s of a large square matmul: the practical ceiling for this machine.

    `torch.mm` goes to MKL's sgemm; `onednn=True` runs the same product through oneDNN's inner
    product (`mkldnn._linear_pointwise`), which JIT-compiles for the CPU's ISA (MKL may not: on AMD
    it can fall back to AVX2 kernels).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        if onednn:
            fn: Callable[[], Any] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # noqa: E731
        else:
            out = torch.empty(size, size)
            fn = lambda: torch.mm(a, b, out=out)  # noqa: E731
        fn()
        seconds = fast(time_block(fn, min_time))
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / seconds / 1e9


def tune_malloc() -> bool:
    """Keep freed activations in glibc's heap instead of returning them to the OS after every call.

    By default glibc serves blocks above a *dynamic* threshold (128 KiB rising to at most 32 MiB as big
    blocks are freed) with fresh mmap()s and trims the heap top, so each forward pass re-faults its
    activation memory: tens of thousands of minor page faults per batch, and a speed that depends on
    what the process allocated before. Fixing both thresholds is equivalent to starting the process
    with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def machine_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Foreign:
    """`with Foreign(own) as f:` ... then `f.cores`: CPU other processes used meanwhile, in cores.

    `own` returns the CPU seconds of everything the benchmark runs (this process by default, plus the
    server it drives): the machine's non-idle time minus that is somebody else's load.
    """

    def __init__(self, own: Callable[[], float] = own_cpu_seconds) -> None:
        self.own = own
        self.cores = 0.0

    def __enter__(self) -> Foreign:
        self._start = (time.perf_counter(), machine_busy_seconds(), self.own())
        return self

    def __exit__(self, *exc: object) -> None:
        t0, busy0, own0 = self._start
        elapsed = time.perf_counter() - t0
        if elapsed > 0:
            self.cores = max(0.0, (machine_busy_seconds() - busy0) - (self.own() - own0)) / elapsed


def wait_quiet(
    max_cores: float = 0.2, window: float = 1.0, timeout: float = 120.0, own: Callable[[], float] = own_cpu_seconds
) -> float:
    """Wait (while idle ourselves) until other processes use less than `max_cores`; returns seconds waited.

    `own` as in `Foreign` (add an idle server's CPU to leave it out). Gives up after `timeout`: a benchmark
    on a busy shared machine still runs, it just says so.
    """
    start = time.perf_counter()
    while True:
        with Foreign(own) as foreign:
            time.sleep(window)
        waited = time.perf_counter() - start
        if foreign.cores < max_cores or waited >= timeout:
            return waited


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: elementwise relative error is meaningless for logits near zero."""
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def median(values: list[float]) -> float:
    return statistics.median(values)
