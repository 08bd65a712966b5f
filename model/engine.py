"""Execution engines for the fused model: the fastest correct way to run a batch on this device.

`aot` (the CPU default) is TorchInductor's code compiled ahead of time into AOTInductor packages, one
per batch bucket (model/aot.py): built once, found on disk at the next start, loaded in milliseconds, no
C++ compiler needed to run them. `compile` is the same Inductor code compiled in-process at every start
(kept as the reference the artifacts are measured against). Both specialise on shapes, so batches are
padded up to a few bucket sizes. `trace` (TorchScript trace + freeze) needs no
compiler; `eager` is the reference for numbers.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from model.configs import IMAGE_SIZE
from model.fuse import FusedLeViT

EngineKind = Literal["auto", "aot", "compile", "trace", "eager"]
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


def _interleaved_medians(
    runs: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, trials: int = LINEAR_TRIALS
) -> dict[str, float]:
    """Median ms per candidate, trials interleaved so machine noise hits all alike; first calls untimed."""
    for run in runs.values():
        run(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(trials):
        for name, run in runs.items():
            times[name].append(_median_ms(lambda r=run: r(x), 1))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def pick_linears(model: nn.Module, batch: int, trials: int = LINEAR_TRIALS) -> tuple[str, dict[str, float]]:
    """Time the model's eager forward with oneDNN and with MKL linears on this CPU; the faster wins.

    Which library is faster depends on the CPU: oneDNN's JIT kernels ran 2x MKL's sgemm on an AMD Zen 4
    (AVX-512 with bf16), but compiled MKL linears beat them on an Intel Xeon without bf16 (1.53x against
    1.32x the training form). The eager forms differ only in the linears, so they rank the two in about
    a second, before anything is compiled. Trials are interleaved so machine noise hits both alike.
    """
    candidates = {"onednn": onednn_linears(copy.deepcopy(model)), "mkl": model}
    x = torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        medians = _interleaved_medians(candidates, x, trials)
    return min(medians, key=medians.__getitem__), medians


def linear_sets(dtype: torch.dtype, wanted: str) -> list[str]:
    """The sets of linear layers compiled artifacts in `dtype` come in, in order of preference; `wanted` is
    LEVIT_LINEARS or a comma-separated list (the builder's `--linears`).

    oneDNN or MKL is float32's choice. Inductor packs a bfloat16 model's plain linears for oneDNN itself, so
    other dtypes have one set, named `default`.
    """
    if dtype != torch.float32:
        return ["default"]
    if wanted == "auto":
        return ["onednn", "mkl"] if torch.backends.mkldnn.is_available() else ["mkl"]
    return wanted.split(",")


def resolve_kind(kind: EngineKind, device: torch.device) -> EngineKind:
    """`auto`: the AOT artifact on CPU (found on disk, or built where a compiler exists; else trace), eager on GPU."""
    if kind != "auto":
        return kind
    return "aot" if device.type == "cpu" else "eager"


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
        artifact_dirs: list[Path] | None = None,
    ) -> None:
        from model.aot import Artifact

        self.device = torch.device(device)
        self.dtype = dtype
        self.auto = kind == "auto"
        self.kind = resolve_kind(kind, self.device)
        if self.kind == "aot" and self.device.type != "cpu":
            raise ValueError("LEVIT_ENGINE=aot is CPU-only; use eager on GPU")
        self.max_batch_size = max_batch_size
        self.model: nn.Module | None = model.to(self.device, dtype).eval()  # None once artifacts serve
        self._plain = self.model
        self.artifact: Artifact | None = None
        self.fallback: str | None = None  # why `auto` could not use the artifact
        self.linear_ms: dict[str, float] = {}
        self.threads_for: dict[int, int] = {}  # bucket -> intra-op threads, when tune_threads() chose them
        if self.kind == "aot":
            self.buckets: tuple[int, ...] = bucket_sizes(max_batch_size)
            dirs = artifact_dirs or [Path(tempfile.mkdtemp(prefix="levit-engine-"))]
            runners = self._build_aot(linears, dirs)
            if runners is not None:
                self._run = lambda x: runners[x.shape[0]](x)
                self.model = self._plain = None  # the artifacts hold the weights: the eager copies (~50 MB) go
                return
        self.linears, self.linear_ms = self._choose_linears(linears)
        if self.linears == "onednn":
            self.model = onednn_linears(copy.deepcopy(self._plain))
        self.buckets = bucket_sizes(max_batch_size) if self.kind == "compile" else ()
        self._run = self._build()

    def _with_linears(self, linears: str) -> nn.Module:
        return onednn_linears(copy.deepcopy(self._plain)) if linears == "onednn" else self._plain

    def _build_aot(self, wanted: LinearKind, dirs: list[Path]) -> dict[int, Callable] | None:
        """One artifact per bucket, found or built; with `auto` linears, the faster of the sets found.

        Timing the compiled artifacts themselves is both truer than the eager proxy and stable across
        restarts: whichever sets a restart finds, it does not compile again because a noisy eager timing
        flipped. Only when none is found does the eager timing choose which set to build.
        Returns None after logging why, when `auto` falls back to trace.
        """
        from model import aot

        names = linear_sets(self.dtype, wanted)
        models = {name: self._with_linears(name) for name in names}
        rejected: list[str] = []
        if len(names) > 1:
            names = self._faster_first(models, names, dirs)
        found = next(
            (
                (name, hit)
                for name in names
                if (hit := aot.find(models[name], self.dtype, name, dirs, self.buckets, rejected))
            ),
            None,
        )
        try:
            if found is not None:
                choice, (runners, self.artifact) = found
                if self.linear_ms:  # timed: the faster set, or the other where the faster is incomplete
                    log.info("linears: %s (compiled artifacts at batch %d, median ms: %s)", choice,
                             self._linears_batch(),
                             ", ".join(f"{k} {v:.1f}" for k, v in self.linear_ms.items()))  # fmt: skip
            else:
                choice, self.linear_ms = (names[0], {}) if len(names) == 1 else self._choose_linears("auto")
                runners, self.artifact = aot.create(
                    models[choice], self.dtype, choice, dirs, self.buckets, tuple(rejected)
                )
        except aot.ArtifactError as error:
            if not self.auto:
                raise
            self.fallback = str(error)
            log.warning("engine: no AOT artifact (%s); falling back to trace", error)
            self.kind = "trace"
            return None
        self.linears, self.model = choice, models[choice]
        start = time.perf_counter()
        saved = aot.share_constants(runners)
        if saved:
            log.info("engine buckets share one copy of the weights: %.0f MB less memory (%.2fs)", saved / 2**20,
                     time.perf_counter() - start)  # fmt: skip
        return runners

    def _linears_batch(self) -> int:
        """The bucket the compiled sets of linears are timed at (the log names it)."""
        return self.padded_size(min(self.max_batch_size, 16))

    def _faster_first(self, models: dict[str, nn.Module], names: list[str], dirs: list[Path]) -> list[str]:
        """`names` (sets of linears), the faster first where artifacts of several are on disk: one bucket of each
        (the batch the choice is made at) is loaded and timed.

        Only that bucket: AOTInductor never unmaps a library it has loaded, so loading every bucket of both sets
        kept the slower set's five libraries (155 MB) in the process for its whole life.
        """
        from model import aot

        batch = self._linears_batch()
        hits = {n: hit for n in names if (hit := aot.find(models[n], self.dtype, n, dirs, (batch,), []))}
        if len(hits) < 2:
            return names
        with torch.inference_mode():
            self.linear_ms = _interleaved_medians(
                {n: runners[batch] for n, (runners, _) in hits.items()}, self._example(batch)
            )
        hits.clear()
        return sorted(self.linear_ms, key=self.linear_ms.__getitem__)

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
        if self.device.type == "cuda":  # kernels run asynchronously: a fault shows here, not in the first request
            torch.cuda.synchronize(self.device)

    def tune_threads(self, threads: int, trials: int = LINEAR_TRIALS) -> dict[int, int]:
        """Per bucket, the faster of 1 and `threads` intra-op threads on this CPU, timed now; used from then on.

        With OpenMP's passive wait policy (model processes, `LEVIT_THREAD_POLICY=sleep`) a team's threads
        sleep at barriers instead of spinning, which leaves cores to decoding under load, but every parallel
        region then pays a wake-up: small batches can run faster on one thread. Which batch sizes do is a
        property of the CPU and the model, so it is measured, not assumed.
        """
        if threads <= 1 or self.device.type != "cpu":
            return {}
        chosen = {}
        for size in self.buckets or sorted({1, self.max_batch_size}):
            x = self._example(size)
            runs = {n: (lambda x, n=n: self._timed_call(x, n)) for n in (1, threads)}
            with torch.inference_mode():
                medians = _interleaved_medians(runs, x, trials)
            chosen[size] = min(medians, key=medians.__getitem__)
            log.info("batch %d: %d thread(s) (median ms: %s)", size, chosen[size],
                     ", ".join(f"{k} threads {v:.1f}" for k, v in medians.items()))  # fmt: skip
        torch.set_num_threads(threads)
        self.threads_for = chosen
        return chosen

    def _timed_call(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        return self._run(x)

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
        threads = self.threads_for.get(padded)
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return self._run(batch)[:n].float()
