"""What the supervisor needs to start a model process, without importing what that process runs.

The supervisor only binds sockets, lays out the ring and watches its children: importing torch there (as
`service.batching.instance` does) cost it about 150 MB and a second before the first child could start.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass

from service.batching.ring import Pipes, RingSpec
from service.settings import Settings


@dataclass(frozen=True)
class InstanceSpec:
    """What a spawned model process needs: picklable."""

    index: int
    epoch: int
    settings: Settings
    ring: RingSpec
    pipes: Pipes
    cores: tuple[int, ...] | None = None  # pinned to these (LEVIT_PIN_CORES), before any thread exists


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: the kernel sends `sig` to this process when the supervisor dies, so no orphan keeps a port."""
    import ctypes

    with contextlib.suppress(OSError):  # not glibc: no parent-death signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def run_instance(spec: InstanceSpec) -> None:
    """The spawned model process's entry point (`service.batching.instance.main`), imported there."""
    from service.batching.instance import main

    main(spec)
