"""Thread pools whose threads carry their names down to the OS.

Python 3.11 names threads only for itself; `top -H`, `ps -L`, py-spy and the per-thread CPU split
that `bench.server` prints read the kernel's name, which threads (OpenMP workers included) inherit
from the thread that created them.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OS_NAME_LIMIT = 15  # bytes, not counting the terminating NUL (Linux TASK_COMM_LEN)


def name_os_thread(name: str | None = None) -> None:
    """Give the kernel the current thread's name, `name` or the Python one (Linux; a no-op elsewhere)."""
    name = (name or threading.current_thread().name)[:OS_NAME_LIMIT]
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name)


def named_pool(prefix: str, workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=name_os_thread)
