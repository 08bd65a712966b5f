"""Thread pools whose threads carry their names down to the OS.

Python 3.11 names threads only for itself; `top -H`, `ps -L`, py-spy and the per-thread CPU split
that `bench.server` prints read the kernel's name, which threads (OpenMP workers included) inherit
from the thread that created them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

Priority = Literal["normal", "idle"]
ThreadPolicy = Literal["brief", "spin", "sleep"]

OS_NAME_LIMIT = 15  # bytes, not counting the terminating NUL (Linux TASK_COMM_LEN)


def name_os_thread(name: str | None = None) -> None:
    """Give the kernel the current thread's name, `name` or the Python one (Linux; a no-op elsewhere)."""
    name = (name or threading.current_thread().name)[:OS_NAME_LIMIT]
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name)


def lower_priority(priority: Priority) -> None:
    """`idle`: the current thread runs only on a core that nothing else wants (Linux SCHED_IDLE, which an
    unprivileged thread may choose); elsewhere, or refused, it stays as it was."""
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


def openmp_environment(policy: ThreadPolicy, spin_count: int) -> dict[str, str]:
    """What a model process's OpenMP runtime reads at load time for `policy` (the names libgomp, which torch's
    Linux wheels ship, understands).

    Why `brief` exists: a team that spins until its next parallel region holds a core for milliseconds after
    every forward, and holds its own core while a preempted partner thread is away, both times while decoders
    wait for it (on 2 cores, 16 images took 108-118 ms in the server against 60 ms alone). A team that never
    spins pays a wake-up at each of a forward's hundreds of regions. `brief` is the default since admission
    holds a place for requests still uploading (`service.core.Admission`): before, its 503s under a 3x surge
    took 100-750 ms, because more requests were admitted and then refused after their uploads (docs/benchmarks.md).
    """
    if policy == "sleep":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    if policy == "brief":
        return {"GOMP_SPINCOUNT": str(spin_count)}
    return {}


def spin_count() -> int:
    """GOMP_SPINCOUNT as this process's OpenMP read it (a user's own value included); 0 = unset or not a
    plain count: the runtime's own choice, which `LEVIT_THREAD_POLICY` names."""
    value = os.environ.get("GOMP_SPINCOUNT", "")
    return int(value) if value.isdigit() else 0


def _init_thread(priority: Priority) -> None:
    name_os_thread()
    lower_priority(priority)


def named_pool(prefix: str, workers: int, priority: Priority = "normal") -> ThreadPoolExecutor:
    initializer = functools.partial(_init_thread, priority)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=initializer)
