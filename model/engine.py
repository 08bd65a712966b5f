"""Execution engines for the fused model: the fastest correct way to run a batch on this device.

`compile` (TorchInductor with frozen weights) is the fastest CPU path measured (docs/benchmarks.md)
but specialises on shapes, so batches are padded up to a few fixed bucket sizes, each compiled once
at warm-up. `trace` (TorchScript trace + freeze) needs no C++ compiler; `eager` is the reference.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from model.configs import IMAGE_SIZE
from model.fuse import FusedLeViT

EngineKind = Literal["auto", "compile", "trace", "eager"]
LinearKind = Literal["auto", "onednn", "mkl"]
LINEAR_TRIALS = 5  # interleaved timings per candidate at warm-up; the median decides
log = logging.getLogger(__name__)


class OneDnnLinear(nn.Module):
    """`nn.Linear` through oneDNN's inner product instead of MKL's sgemm: the same fp32 math.

    On the AMD AVX-512 machine we measured, MKL's sgemm reaches ~230 GFLOP/s on 2 cores and oneDNN's
    JIT kernels ~500, and Inductor's weight pre-packing picks MKL for fp32, so the op is called
    explicitly (docs/benchmarks.md). The input is flattened to 2-D, the form Inductor's freezing expects.
    """

    def __init__(self, src: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(src.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(src.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def onednn_linears(module: nn.Module) -> nn.Module:
    """Swap every `nn.Linear` (in place) for `OneDnnLinear`; CPU fp32 only."""
    for name, child in list(module.named_children()):
        setattr(module, name, OneDnnLinear(child) if isinstance(child, nn.Linear) else onednn_linears(child))
    return module


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below the maximum, plus the maximum: at most 2x padding, few compilations."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def _median_ms(run: Callable[[], object], trials: int) -> float:
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def pick_linears(model: nn.Module, batch: int, trials: int = LINEAR_TRIALS) -> tuple[str, dict[str, float]]:
    """Time the model's eager forward with oneDNN and with MKL linears on this CPU; the faster wins.

    Which library is faster depends on the CPU: oneDNN's JIT kernels ran 2x MKL's sgemm on an AMD Zen 4
    (AVX-512 with bf16), but compiled MKL linears beat them on an Intel Xeon without bf16 (1.53x against
    1.32x the training form). The eager forms differ only in the linears, so they rank the two in about
    a second, before anything is compiled. Trials are interleaved so machine noise hits both alike.
    """
    candidates = {"onednn": onednn_linears(copy.deepcopy(model)), "mkl": model}
    x = torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for module in candidates.values():
            module(x)  # first call: allocations, oneDNN kernel generation
        for _ in range(trials):
            for name, module in candidates.items():
                times[name].append(_median_ms(lambda m=module: m(x), 1))
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return min(medians, key=medians.__getitem__), medians


def resolve_kind(kind: EngineKind, device: torch.device) -> EngineKind:
    """`auto`: compile where Inductor can build kernels (a C++ compiler on CPU), else trace."""
    if kind != "auto":
        return kind
    if device.type == "cpu":
        return "compile" if shutil.which("g++") or shutil.which("c++") else "trace"
    return "eager"


class Engine:
    """Callable on `[B,3,224,224]` batches of any size up to `max_batch_size`; returns logits `[B,1000]`."""

    def __init__(
        self,
        model: FusedLeViT,
        kind: EngineKind = "auto",
        max_batch_size: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        linears: LinearKind = "auto",
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.kind = resolve_kind(kind, self.device)
        self.max_batch_size = max_batch_size
        self.model = model.to(self.device, dtype).eval()
        self.linears, self.linear_ms = self._choose_linears(linears)
        if self.linears == "onednn":
            self.model = onednn_linears(self.model)
        self.buckets = bucket_sizes(max_batch_size) if self.kind == "compile" else ()
        self._run = self._build()

    def _choose_linears(self, wanted: LinearKind) -> tuple[str, dict[str, float]]:
        """CPU fp32 linears: oneDNN or MKL, by measurement unless set; "default" elsewhere."""
        onednn = self.device.type == "cpu" and self.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        if not onednn:
            return "default", {}
        if self.kind == "trace":  # TorchScript cannot trace the oneDNN op's optional-scalar list
            return "mkl", {}
        if wanted != "auto":
            return wanted, {}
        choice, medians = pick_linears(self.model, min(self.max_batch_size, 16))
        log.info("linears: %s (eager batch forward, median ms: %s)", choice,
                 ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))  # fmt: skip
        return choice, medians

    def _build(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.kind == "eager":
            return self.model
        if self.kind == "trace":
            example = self._example(min(self.max_batch_size, 8))
            with torch.inference_mode():
                traced = torch.jit.trace(self.model, example, check_trace=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        return torch.compile(self.model, dynamic=False)

    def _example(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=self.device, dtype=self.dtype)

    def warmup(self) -> None:
        """Run every batch size the server will use once, so no request pays a compilation."""
        sizes = self.buckets or sorted({1, self.max_batch_size})
        for size in sizes:
            self(self._example(size))

    def padded_size(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        return batch

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if n > self.max_batch_size:
            raise ValueError(f"batch of {n} exceeds max_batch_size {self.max_batch_size}")
        batch = batch.to(self.device, self.dtype, non_blocking=True)
        padded = self.padded_size(n)
        if padded != n:
            batch = torch.cat([batch, batch.new_zeros(padded - n, *batch.shape[1:])])
        with torch.inference_mode():
            return self._run(batch)[:n].float()
