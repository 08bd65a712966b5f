"""Processes a benchmark starts: free ports, dying with the benchmark, and the CPU of a whole process tree.

A server under test is a tree (levit-serve's supervisor, front-ends and model processes; TorchServe's
launcher, JVM and workers), so its CPU is the sum over the root and every live descendant, read from /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the benchmark dies, so no server outlives its run (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cpu_of(stat: Path) -> float:
    """User + system CPU seconds from a /proc `stat` file (a process's or one thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants, from the parent pids in /proc/<pid>/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        tree += sorted(frontier)
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds so far of `root` and every live descendant (all their threads)."""
    total = 0.0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):  # a process may exit between listing and reading
            total += cpu_of(Path(f"/proc/{pid}/stat"))
    return total
