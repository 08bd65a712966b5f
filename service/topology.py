"""How many processes and threads, from the machine: the one place the defaults are decided.

Measured (docs/benchmarks.md): LeViT is too small for a wide OpenMP team. On 16 cores four
processes of four threads ran the model 1.8x faster than one process of sixteen, and a team that
spins at barriers while decoding threads hold its cores wastes both. So CPU instances get a few
threads each, and some cores are left to the front-ends, which decode. A GPU gets one model
process (it batches across all front-ends) with two threads, and the front-ends get the cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

THREADS_PER_CPU_INSTANCE = 4
CORES_PER_FRONTEND = 4
GPU_INSTANCE_THREADS = 2


@dataclass(frozen=True)
class Topology:
    kind: str  # "process" or "thread"
    workers: int
    instances: int
    threads: int
    cores: int
    device: str  # "cpu" or "cuda[:N]"
    split: bool = False  # two model processes splitting batches (service.batching.pair)

    def core_sets(self, pin: bool) -> tuple[list[tuple[int, ...] | None], tuple[int, ...] | None]:
        """With `pin`: model instance i gets its own `threads` cores, the front-ends the cores left over.

        A model process whose OpenMP team shares its cores with decoding threads spins at every barrier
        a preempted team-mate holds up (docs/benchmarks.md); dedicated cores avoid that. Only when the
        instances leave at least one core for the front-ends; otherwise nothing is pinned.
        """
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        used = self.instances * self.threads
        if not pin or self.kind != "process" or used >= len(cpus):
            return [None] * self.instances, None
        per = [tuple(cpus[i * self.threads : (i + 1) * self.threads]) for i in range(self.instances)]
        return per, tuple(cpus[used:])


def usable_cores() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA's driver, ROCm's, WSL2's


def resolve_device(name: str) -> str:
    """`auto`: CUDA when torch sees a device. Without any GPU driver's device node torch cannot, and the
    supervisor (which plans here) is spared importing it: about 150 MB and a second before any child starts."""
    if name != "auto":
        return name
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def plan(settings: Settings, cores: int | None = None, device: str | None = None) -> Topology:
    """Every `0 = from the machine` setting made concrete; explicit settings are kept as given."""
    cores = cores or usable_cores()
    device = device or resolve_device(settings.device)
    if settings.instance_kind == "thread":
        return Topology("thread", 1, 1, settings.threads or cores, cores, device)
    if device.startswith("cuda"):
        instances = settings.instances or 1
        threads = settings.threads or GPU_INSTANCE_THREADS
        workers = settings.workers or max(1, (cores - instances * threads) // 2)
        return Topology("process", workers, instances, threads, cores, device)
    if _paired(settings, cores):
        return Topology("process", settings.workers or 1, 2, settings.threads or cores, cores, device, split=True)
    instances = settings.instances or max(1, cores // THREADS_PER_CPU_INSTANCE)
    reserve = cores // CORES_PER_FRONTEND if cores >= 8 else 0  # cores left for decoding
    threads = settings.threads or max(1, (cores - reserve) // instances)
    workers = settings.workers or max(1, cores // CORES_PER_FRONTEND)
    return Topology("process", workers, instances, threads, cores, device)


def _paired(settings: Settings, cores: int) -> bool:
    """LEVIT_SPLIT_BATCHES: `auto` pairs two model processes where one would otherwise run a team of 2-3
    threads beside the decoders (the only machines it was measured on: 2 cores)."""
    if settings.split_batches == "off":
        return False
    if settings.split_batches == "on":
        if settings.instances not in (0, 2):
            raise ValueError("LEVIT_SPLIT_BATCHES=on pairs exactly two model instances (LEVIT_INSTANCES=2 or unset)")
        return True
    return settings.instances == 0 and 2 <= cores <= 3


def resolved(settings: Settings, topology: Topology) -> Settings:
    """The settings each process runs with: no `0 = auto` left, so every process agrees (the device too: a
    model process asking torch again could find a GPU the plan was not made for)."""
    return settings.model_copy(
        update={
            "workers": topology.workers,
            "instances": topology.instances,
            "threads": topology.threads,
            "split_batches": "on" if topology.split else "off",
            "device": topology.device,
        }
    )
