"""The loaded model as the server sees it: the engine, its metadata, and the memory loading it left behind."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from typing import Any

import torch

from model.configs import IMAGE_SIZE, get_config
from model.cost import count_macs, count_params
from model.engine import Engine
from model.fuse import fuse
from model.loader import load_weights
from model.precision import cpu_dtype_problem
from service import metrics
from service.settings import Settings
from service.threads import spin_count

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def release_freed_memory() -> int:
    """Give the heap that loading left free back to the system; returns the bytes of resident memory released.

    Loading frees a lot: the eager models the artifacts replace, the set of linears that lost the timing, the
    weights of buckets that now share one copy. glibc keeps freed memory in its arenas for reuse, and a model
    process then stays that much larger for its whole life: measured 95 MB in the process that times the
    linears and about 30 MB in the others (docs/benchmarks.md). Not glibc (musl): nothing to do.
    """
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return 0
    before = _resident_bytes()
    trim(0)
    return max(0, before - _resident_bytes())


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the release still happens, it is only not measured
        return 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"LEVIT_DEVICE={name} but no CUDA device is available")
    return device


class ModelRuntime:
    """Everything the protocols need from the model, built once at start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        dtype = DTYPES[settings.dtype]
        if self.device.type == "cpu" and (problem := cpu_dtype_problem(dtype)):
            raise RuntimeError(problem)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.config = get_config(settings.model)
        start = time.perf_counter()
        trained, self.weights = load_weights(
            settings.model, settings.weights, settings.cache_dir, settings.require_pretrained
        )
        self.params = count_params(trained)
        self.macs = count_macs(self.config)
        self.engine = Engine(
            fuse(trained),
            settings.engine,
            settings.max_batch_size,
            self.device,
            dtype,
            settings.linears,
            settings.engine_dirs,
        )
        artifact = self.engine.artifact
        log.info(
            "loaded %s (%s) on %s/%s engine=%s%s in %.1fs",
            self.config.name, self.weights.id, self.device, settings.dtype, self.engine.kind,
            f" ({artifact.origin} artifacts in {artifact.folder}, {artifact.isa}, batch sizes {sorted(artifact.keys)})"
            if artifact
            else "",
            time.perf_counter() - start,
        )  # fmt: skip
        metrics.MODEL_INFO.labels(self.config.name, self.weights.id, str(self.device), settings.dtype).set(1)

    @classmethod
    def warm(cls, settings: Settings) -> ModelRuntime:
        """Load, then run every batch size once: call it in the thread that will run the model."""
        runtime = cls(settings)
        released = release_freed_memory()
        start = time.perf_counter()
        runtime.engine.warmup()
        if settings.thread_policy == "sleep" and settings.instance_kind == "process":
            runtime.engine.tune_threads(torch.get_num_threads())
        log.info("warm-up done in %.1fs (batch sizes %s; %d MB of freed start-up memory returned first)",
                 time.perf_counter() - start, runtime.engine.buckets or "any", released // 2**20)  # fmt: skip
        return runtime

    def describe(self) -> dict[str, Any]:
        """`GET /v1/model` and gRPC `GetModel`."""
        s = self.settings
        return {
            "name": self.config.name,
            "weights": {
                "id": self.weights.id,
                "source": self.weights.source,
                "sha256": self.weights.sha256,
                "pretrained": self.weights.pretrained,
            },
            "parameters": self.params,
            "macs_per_image": self.macs,
            "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
            "num_classes": 1000,
            "device": str(self.device),
            "dtype": s.dtype,
            "engine": self.engine.kind,
            "engine_artifact": self.engine.artifact.describe() if self.engine.artifact else None,
            "engine_fallback": self.engine.fallback or "",
            "linears": self.engine.linears,
            "instances": {
                "kind": s.instance_kind,
                "count": s.instances or 1,
                "threads": torch.get_num_threads(),
                "split_batches": s.split_batches == "on",
                "policy": s.thread_policy if s.instance_kind == "process" else "spin",
                "spin_count": spin_count(),
                "threads_by_batch": {str(k): v for k, v in self.engine.threads_for.items()},
                "workers": s.workers or 1,
            },
            "batching": {
                "max_batch_size": s.max_batch_size,
                "max_batch_delay_ms": s.max_batch_delay_ms,
                "max_queue": s.max_queue,
                "request_timeout_ms": s.request_timeout_ms,
            },
        }
