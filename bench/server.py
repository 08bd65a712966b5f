"""The real server under load, next to the model-only throughput measured in the same run.

    python -m bench.server [--engine auto|compile|trace|eager] [--threads N] [--max-batch-size 16]
                           [--protocols http,grpc-unary,grpc-stream] [--concurrency 1,8,32]
                           [--rounds 2] [--seconds 6] [--quick] [--py-spy DIR]

Starts `python -m service` as a subprocess (random weights, free ports, the default engine unless
`--engine`), waits for /readyz (a first compile warm-up takes minutes; Inductor caches on disk), then
per round: times the engine in this process while the server is idle (batch 1 and larger batch sizes
up to the server's max batch size), and drives the server with closed-loop clients (bench.loadgen) on
two payload sets: the test photos (tests/data/images, round-robin) and a generated 12-megapixel
JPEG (a photo upscaled to 4000x3000, quality 90). Every request carries one image.

Floors (HTTP, test photos): at concurrency 32 the server delivers >= 1.1x the in-process serial pipeline
(decode + crop + forward at the best batch + softmax, one thread of control, measured in the same round)
and >= 75% of the model-only best-batch throughput; at concurrency 1 the median latency is <= the model's
batch-1 latency + 3 ms. `--configs` runs several server configurations side by side (floors: the first).
Each floor is evaluated per round (model-only and load measured minutes apart on a shared machine)
and the median over rounds is reported. With gRPC stubs present, gRPC rows are compared with HTTP.

`--instance-grid 1x16,2x8,4x4,8x2` (or `auto`: every power-of-two split of the cores; the default on 8 or more
cores, which also add 128 clients) also measures, in each round, the model alone as N processes x T threads
(bench.instances) and judges issue 11's many-core floor: photos at the highest concurrency >= 70% of the best
of those, over HTTP and over each gRPC protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from PIL import Image

from bench.instances import EngineSpec, Shape, best, default_grid, describe, measure_grid, parse_grid
from bench.loadgen import DRIVERS, LevelResult, Payload, grpc_available, run_level
from bench.procs import cpu_of, die_with_parent, free_port, process_tree, tree_cpu_seconds
from bench.timing import Foreign, all_cores, load_average, median, own_cpu_seconds, wait_quiet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT / "tests" / "data" / "images"
BIG_SIZE = (4000, 3000)
THROUGHPUT_FLOOR = 0.75  # of the model-only best-batch images/s, at the highest concurrency
SERIAL_FLOOR = 1.1  # x the in-process serial pipeline's images/s, HTTP photos at the highest concurrency
LATENCY_SLACK_MS = 3.0  # over the model's batch-1 latency, median at concurrency 1
GRID_FLOOR = 0.70  # of the best model-only processes x threads images/s, photos at the highest concurrency
GRID_SECONDS = 4.0  # measured seconds per processes x threads shape
MANY_CORES = 8  # from here on, `make bench` also measures the processes x threads grid and 128 clients
READY_TIMEOUT_S = 1800.0
NOISY_CORES = 0.3  # a level during which other processes used more CPU than this is run again
RETRIES = 2
QUIET_TIMEOUT_S = 60.0  # longest wait for a quiet machine before each measurement
SERVER_METRICS = frozenset(
    f"levit_{name}_{part}"
    for name in ("batch_size", "model_forward_seconds", "preprocess_seconds")
    for part in ("sum", "count")
)  # a cold Inductor cache on a busy machine: generous, this is not a test


# --- payloads --------------------------------------------------------------------------------------------


def big_jpeg(photo: Path, size: tuple[int, int] = BIG_SIZE, quality: int = 90) -> bytes:
    """A phone-sized upload: the photo upscaled (bicubic) to cover `size`, centre-cropped, JPEG-encoded."""
    with Image.open(photo) as image:
        rgb = image.convert("RGB")
    scale = max(size[0] / rgb.width, size[1] / rgb.height)
    scaled = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BICUBIC)
    left, top = (scaled.width - size[0]) // 2, (scaled.height - size[1]) // 2
    buffer = BytesIO()
    scaled.crop((left, top, left + size[0], top + size[1])).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def payload_sets(images: Path) -> dict[str, list[Payload]]:
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no JPEG photos in {images}")
    photos = [Payload(p.name, p.read_bytes()) for p in paths]
    big = Payload(f"{paths[0].stem}-{BIG_SIZE[0]}x{BIG_SIZE[1]}.jpg", big_jpeg(paths[0]))
    return {"photos": photos, "12MP": [big]}


# --- the server subprocess -------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    env: dict[str, str]
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="levit-bench-", suffix=".log")[1]))
    prelude: str = ""  # Python run in the server process before `service` starts (an experiment hook)
    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if not self.prelude:
            return [sys.executable, "-m", "service"]
        code = f"{self.prelude}\nimport runpy\nrunpy.run_module('service', run_name='__main__', alter_sys=True)"
        return [sys.executable, "-c", code]

    def start(self) -> None:
        env = {
            **os.environ,
            "LEVIT_WEIGHTS": "random",
            "LEVIT_HOST": "127.0.0.1",
            "LEVIT_HTTP_PORT": str(self.http_port),
            "LEVIT_GRPC_PORT": str(self.grpc_port),
            "LEVIT_LOG_LEVEL": "WARNING",
            **self.env,
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=die_with_parent
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, poll: float = 0.5) -> float:
        """Seconds from now to /readyz 200, asked every `poll` seconds."""
        assert self.proc is not None
        start = time.monotonic()
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
            time.sleep(poll)
        raise SystemExit(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """The server's own Prometheus counters this benchmark reads (histogram sums and counts)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in SERVER_METRICS:
                out[name] = float(value)
        return out

    def pids(self) -> list[int]:
        """The server and its live descendants (the supervisor's front-end and model processes)."""
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU of every live server process (all threads) so far."""
        return tree_cpu_seconds(self.pid)

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds so far by OS thread name (service/threads.py names the pools; OpenMP workers
        inherit `levit-model`, the event loop is the main thread), numbered pool threads summed."""
        out: dict[str, float] = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):  # a thread may exit between listing and reading
                        name = (task / "comm").read_text().strip().rstrip("0123456789").rstrip("_-")
                        out[name] = out.get(name, 0.0) + cpu_of(task / "stat")
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- model-only ------------------------------------------------------------------------------------------


class ModelOnly:
    """The server's engine (`EngineSpec`: same variant, random weights, kind, max batch size, linears, dtype) in this
    process, on the server's device, with `threads` intra-op threads."""

    def __init__(self, spec: EngineSpec, threads: int, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        self.threads = threads
        torch.set_num_threads(threads)
        self.engine = spec.build(device)
        self.batches = sorted({1, spec.max_batch_size, max(1, spec.max_batch_size // 2)})
        gen = torch.Generator().manual_seed(0)
        self.inputs = {b: torch.randn(b, 3, 224, 224, generator=gen) for b in self.batches}
        with torch.inference_mode():
            for x in self.inputs.values():
                self.engine(x)  # compiles here (an Inductor cache hit after the server's warm-up)

    def measure(self, min_time: float) -> tuple[dict[int, float], dict[int, float]]:
        """Mean and median seconds per call for each batch size.

        The mean compares with the server's throughput (also an average over a window), the median
        with its latency percentiles.
        """
        from bench.timing import time_block

        self.torch.set_num_threads(self.threads)
        means, medians = {}, {}
        wait_quiet(timeout=QUIET_TIMEOUT_S)
        with self.torch.inference_mode():
            for batch, x in self.inputs.items():
                self.engine(x)
                best: tuple[float, list[float]] | None = None
                for _ in range(1 + RETRIES):
                    with Foreign() as foreign:
                        times = time_block(
                            lambda x=x: self.engine(x).cpu(), min_time
                        )  # .cpu(): a GPU's async work ends
                    if best is None or foreign.cores < best[0]:
                        best = (foreign.cores, times)
                    if foreign.cores <= NOISY_CORES:
                        break
                assert best is not None
                times = best[1]
                means[batch], medians[batch] = sum(times) / len(times), median(times)
        return means, medians


def serial_pipeline(model: ModelOnly, payloads: list[Payload], batch: int, min_time: float) -> float:
    """Images/s of the best a single thread of control can do: decode (same draft rule) and crop `batch`
    photos round-robin, normalise, forward at `batch`, softmax; again. No overlap of decoding and inference:
    the server must beat this by overlapping them (and batching across clients)."""
    from model.transforms import batch_input
    from service.imaging import load_image_pixels

    torch = model.torch
    torch.set_num_threads(model.threads)
    with torch.inference_mode():  # one untimed pass: the first decode and batch pay one-off costs
        crops = [load_image_pixels(p.data, filename=p.filename, max_pixels=50_000_000) for p in payloads]
        model.engine(batch_input((crops * batch)[:batch])).softmax(dim=-1).cpu()
    wait_quiet(timeout=QUIET_TIMEOUT_S)
    images, start, index = 0, time.perf_counter(), 0
    with torch.inference_mode():
        while True:
            crops = []
            for _ in range(batch):
                p = payloads[index % len(payloads)]
                crops.append(load_image_pixels(p.data, filename=p.filename, max_pixels=50_000_000))
                index += 1
            model.engine(batch_input(crops)).softmax(dim=-1).cpu()  # as the server hands probabilities back
            images += batch
            elapsed = time.perf_counter() - start
            if elapsed >= min_time and images >= 4 * batch:
                return images / elapsed


def decode_ms(payloads: list[Payload], min_time: float) -> float:
    """Mean over payloads of the fast-quantile decode + preprocess time on one thread (the server's path)."""
    import torch

    from bench.timing import fast, time_block
    from service.imaging import load_image_pixels

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = [
            fast(
                time_block(lambda p=p: load_image_pixels(p.data, filename=p.filename, max_pixels=50_000_000), min_time)
            )
            for p in payloads
        ]
    finally:
        torch.set_num_threads(previous)
    return 1000 * sum(times) / len(times)


def budget(rounds: list[Round], decode: dict[str, float], threads: int, cores: int) -> None:
    """How much of the model-only throughput a server can deliver at all, once it also decodes on these cores."""
    best = median([r.model_ips(r.best_batch) for r in rounds])
    model_core_ms = threads * 1000 / best
    for name, ms in decode.items():
        ceiling = cores * 1000 / (model_core_ms + ms)
        room = cores * 1000 / (THROUGHPUT_FLOOR * best) - model_core_ms
        print(
            f"CPU budget, {name}: model {model_core_ms:.2f} core-ms/image + decode {ms:.2f} core-ms/image -> at most "
            f"{ceiling:.0f} img/s on {cores} cores with free HTTP and batching ({100 * ceiling / best:.0f}% of "
            f"model-only); the {100 * THROUGHPUT_FLOOR:.0f}% floor leaves {room:.2f} core-ms/image for decode + HTTP"
        )


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class ServerStats:
    """What the server itself saw during a level: its CPU and means from its histograms."""

    cpu: float  # CPU seconds per second (1.0 = one core)
    batch: float  # images per model call
    forward_ms: float  # wall time of one model call
    preprocess_ms: float  # decode + resize + normalise, per image
    foreign: float = 0.0  # CPU other processes used during the level, in cores


def server_stats(before: dict[str, float], after: dict[str, float], cpu: float, foreign: float) -> ServerStats:
    def mean(name: str) -> float:
        count = after.get(f"levit_{name}_count", 0.0) - before.get(f"levit_{name}_count", 0.0)
        total = after.get(f"levit_{name}_sum", 0.0) - before.get(f"levit_{name}_sum", 0.0)
        return total / count if count else float("nan")

    return ServerStats(cpu, mean("batch_size"), 1000 * mean("model_forward_seconds"), 1000 * mean("preprocess_seconds"))


@dataclass
class Round:
    model: dict[int, float]  # batch -> mean seconds per call
    model_median: dict[int, float]  # batch -> median seconds per call
    serial: float = float("nan")  # images/s of the in-process serial pipeline on the photos
    grid: dict[str, float] = field(default_factory=dict)  # "NxT" -> model-only images/s (--instance-grid)
    levels: list[LevelResult] = field(default_factory=list)
    server: dict[tuple[str, str, int], ServerStats] = field(default_factory=dict)

    def model_ips(self, batch: int) -> float:
        return batch / self.model[batch]

    @property
    def best_batch(self) -> int:
        return max(self.model, key=self.model_ips)

    def level(self, protocol: str, payloads: str, concurrency: int) -> LevelResult | None:
        for result in self.levels:
            if (result.protocol, result.payloads, result.concurrency) == (protocol, payloads, concurrency):
                return result
        return None


async def drive(
    server: ServerProcess,
    sets: dict[str, list[Payload]],
    protocols: list[str],
    concurrency: list[int],
    warmup: float,
    seconds: float,
    round_: Round,
    on_level: Callable[[str, str, int], contextlib.AbstractContextManager[None]],
) -> None:
    for protocol in protocols:
        port = server.http_port if protocol == "http" else server.grpc_port
        for name, payloads in sets.items():
            if name != "photos" and protocol != "http":
                continue  # the 12 MP rows measure decoding, which does not depend on the protocol
            driver = DRIVERS[protocol]("127.0.0.1", port, payloads)
            for c in concurrency:
                best: tuple[LevelResult, ServerStats] | None = None
                for attempt in range(1 + RETRIES):
                    waited = wait_quiet(timeout=QUIET_TIMEOUT_S)
                    before, cpu0, t0 = server.metrics(), server.cpu_seconds(), time.perf_counter()
                    threads0 = server.thread_cpu()
                    with on_level(protocol, name, c), Foreign(lambda: own_cpu_seconds() + server.cpu_seconds()) as f:
                        result = await run_level(driver, len(payloads), c, warmup, seconds, label=name)
                    elapsed = time.perf_counter() - t0
                    cpu = (server.cpu_seconds() - cpu0) / elapsed
                    split = {k: (v - threads0.get(k, 0.0)) / elapsed for k, v in server.thread_cpu().items()}
                    stats = server_stats(before, server.metrics(), cpu, f.cores)
                    if best is None or stats.foreign < best[1].foreign:
                        best = (result, stats)
                    noisy = stats.foreign > NOISY_CORES
                    print(
                        f"  {protocol:<11} {name:<6} c={c:<3} {result.images_per_s:7.1f} img/s  "
                        f"p50 {result.percentile_ms(50):7.1f} ms  p99 {result.percentile_ms(99):7.1f} ms  "
                        f"server CPU {100 * cpu:3.0f}%, batch {stats.batch:4.1f}, forward {stats.forward_ms:5.1f} ms, "
                        f"decode {stats.preprocess_ms:4.1f} ms; loadgen CPU {100 * result.client_cpu:3.0f}%; "
                        f"other processes {100 * stats.foreign:3.0f}%"
                        + "\n      server CPU by thread: "
                        + ", ".join(
                            f"{k} {100 * v:.0f}%" for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v >= 0.01
                        )
                        + (f" (waited {waited:.0f}s for quiet)" if waited > 1.5 else "")
                        + (f"  {result.errors} errors, first: {result.first_error}" if result.errors else "")
                        + ("  -> noisy, again" if noisy and attempt < RETRIES else ""),
                        flush=True,
                    )
                    if not noisy:
                        break
                assert best is not None
                round_.levels.append(best[0])
                round_.server[(protocol, name, c)] = best[1]


def py_spy_recorder(directory: Path | None, pid: int, seconds: float, extra: list[str]) -> Callable:
    """`py-spy record` of the server during the HTTP photos level at the highest concurrency (needs root)."""
    tool = shutil.which("py-spy")

    @contextlib.contextmanager
    def record(protocol: str, payloads: str, concurrency: int) -> object:
        if directory is None or tool is None or (protocol, payloads) != ("http", "photos") or concurrency < 32:
            yield
            return
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / f"server-{protocol}-{payloads}-c{concurrency}-{int(time.time())}.txt"
        cmd = [tool, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--threads", *extra]
        spy = subprocess.Popen(
            [*cmd, "--format", "raw", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            yield
        finally:
            spy.wait()
            print(f"  py-spy profile (collapsed stacks): {out}")

    return record


def table(rounds: list[Round], sets: list[str], protocols: list[str], concurrency: list[int]) -> None:
    best = median([r.model_ips(r.best_batch) for r in rounds])
    print(
        "\n| protocol | payload | clients | img/s | vs model best | p50 ms | p90 ms | p99 ms "
        "| server CPU | batch | forward ms | decode ms | loadgen CPU | other CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for protocol in protocols:
        for name in sets:
            for c in concurrency:
                results = [x for r in rounds if (x := r.level(protocol, name, c)) is not None]
                if not results:
                    continue
                ips = median([x.images_per_s for x in results])
                cells = [median([x.percentile_ms(q) for x in results]) for q in (50, 90, 99)]
                stats = [r.server[(protocol, name, c)] for r in rounds if (protocol, name, c) in r.server]
                client = median([x.client_cpu for x in results])
                errors = sum(x.errors for x in results)
                print(
                    f"| {protocol} | {name} | {c} | {ips:.1f} | {100 * ips / best:.0f}% | "
                    + " | ".join(f"{v:.1f}" for v in cells)
                    + f" | {100 * median([s.cpu for s in stats]):.0f}% | {median([s.batch for s in stats]):.1f} "
                    f"| {median([s.forward_ms for s in stats]):.1f} | {median([s.preprocess_ms for s in stats]):.1f} "
                    f"| {100 * client:.0f}% | {100 * median([s.foreign for s in stats]):.0f}% |"
                    + (f" {errors} errors" if errors else "")
                )


def floors(rounds: list[Round], protocols: list[str], concurrency: list[int]) -> bool:
    top, one = max(concurrency), min(concurrency)
    ok = True
    shares, slacks = [], []
    for r in rounds:
        level = r.level("http", "photos", top)
        if level is not None:
            shares.append(level.images_per_s / r.model_ips(r.best_batch))
        level = r.level("http", "photos", one)
        if level is not None:
            slacks.append(level.percentile_ms(50) - 1000 * r.model_median[1])
    serials = [x.images_per_s / r.serial for r in rounds if (x := r.level("http", "photos", top)) is not None]
    if serials:
        ratio = median(serials)
        passed = ratio >= SERIAL_FLOOR
        ok &= passed
        print(
            f"{'PASS' if passed else 'FAIL'}: HTTP photos at c={top} delivers {ratio:.2f}x the in-process serial "
            f"pipeline (floor {SERIAL_FLOOR:.1f}x; per round {', '.join(f'{v:.2f}x' for v in serials)}; serial "
            f"{median([r.serial for r in rounds]):.1f} img/s)"
        )
    if shares:
        share = median(shares)
        passed = share >= THROUGHPUT_FLOOR
        ok &= passed
        print(
            f"{'PASS' if passed else 'FAIL'}: HTTP photos at c={top} delivers {100 * share:.0f}% of the model-only "
            f"best-batch throughput (floor {100 * THROUGHPUT_FLOOR:.0f}%; per round "
            f"{', '.join(f'{100 * s:.0f}%' for s in shares)})"
        )
    if slacks and one == 1:
        slack = median(slacks)
        passed = slack <= LATENCY_SLACK_MS
        ok &= passed
        print(
            f"{'PASS' if passed else 'FAIL'}: HTTP photos at c=1 p50 is model batch-1 latency + {slack:.1f} ms "
            f"(floor + {LATENCY_SLACK_MS:.0f} ms; per round {', '.join(f'{s:+.1f}' for s in slacks)})"
        )
    ok &= grid_floor(rounds, protocols, top)
    http = median([x.images_per_s for r in rounds if (x := r.level("http", "photos", top))] or [0.0])
    for protocol in protocols:
        if protocol == "http":
            continue
        grpc = median([x.images_per_s for r in rounds if (x := r.level(protocol, "photos", top))] or [0.0])
        verdict = "yes" if grpc >= http else "no"
        print(f"{protocol} c={top} throughput >= HTTP's: {verdict} ({grpc:.1f} vs {http:.1f} img/s)")
    return ok


def grid_share(round_: Round, protocol: str, top: int) -> tuple[float, str] | None:
    """Photos at concurrency `top` over `protocol` as a share of the round's best model-only shape, and that shape;
    None where the round measured no grid or no such level."""
    level = round_.level(protocol, "photos", top)
    if not round_.grid or level is None:
        return None
    shape, ceiling = best(round_.grid)
    return level.images_per_s / ceiling, shape


def grid_floor(rounds: list[Round], protocols: list[str], top: int) -> bool:
    """Issue 11's many-core floor: photos at concurrency `top` >= GRID_FLOOR x the best processes x threads
    model-only figure of the same round, for every protocol measured."""
    ok = True
    for protocol in protocols:
        shares = [share for r in rounds if (share := grid_share(r, protocol, top)) is not None]
        if not shares:
            continue
        share = median([s for s, _ in shares])
        passed = share >= GRID_FLOOR
        ok &= passed
        print(
            f"{'PASS' if passed else 'FAIL'}: {protocol} photos at c={top} delivers {100 * share:.0f}% of the best "
            f"model-only processes x threads (floor {100 * GRID_FLOOR:.0f}%; per round "
            + ", ".join(f"{100 * s:.0f}% of {shape}" for s, shape in shares)
            + ")"
        )
    return ok


def grid_share_line(round_: Round, protocols: list[str], top: int) -> str:
    """This round's photos at concurrency `top` as a share of its best model-only shape, per protocol."""
    shape, ceiling = best(round_.grid)
    shares = [f"{p} {100 * share[0]:.0f}%" for p in protocols if (share := grid_share(round_, p, top)) is not None]
    return f"  photos at c={top} against the best model-only shape ({shape}, {ceiling:.1f} img/s): " + ", ".join(shares)


def grid_shapes(text: str | None, info: dict) -> list[Shape]:
    """`--instance-grid` as shapes; none for a server on a GPU (the grid is the CPU's ceiling)."""
    if not text or text == "none":
        return []
    if info.get("device", "cpu") != "cpu":
        print(f"--instance-grid ignored: the server runs on {info['device']}, the grid measures CPU processes")
        return []
    return default_grid(all_cores()) if text == "auto" else parse_grid(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="LeViT_128S")
    parser.add_argument("--engine", default=None, help="LEVIT_ENGINE for the server and the model-only run")
    parser.add_argument("--threads", type=int, default=0, help="LEVIT_THREADS (0 = all cores)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="LEVIT_MAX_BATCH_SIZE")
    parser.add_argument("--protocols", default=None, help="comma-separated; default http plus gRPC if available")
    parser.add_argument("--concurrency", default=None, help=f"default 1,8,32, and 128 on {MANY_CORES}+ cores")
    parser.add_argument("--payloads", default="photos,12MP", help="photos and/or 12MP")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (quick: 1)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per level (default 6)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s levels")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--env", action="append", default=[], help="extra LEVIT_X=value for the server")
    parser.add_argument(
        "--configs",
        default="default",
        help="server configurations measured side by side in each round: 'NAME[:LEVIT_X=v,LEVIT_Y=w];...'; "
        "floors are judged on the first",
    )
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="run the server with sys.setswitchinterval(S)"
    )
    parser.add_argument("--prelude", default="", help="Python code the server process runs before starting")
    parser.add_argument(
        "--instance-grid",
        default=None,
        help="model-only processes x threads shapes measured each round, e.g. 1x16,2x8,4x4, auto (see above) or "
        f"none; default auto on {MANY_CORES}+ cores, else none",
    )
    parser.add_argument("--py-spy", type=Path, default=None, help="write a py-spy profile of the c=32 HTTP level")
    parser.add_argument("--py-spy-args", default="", help="extra py-spy record flags, e.g. '--gil' or '--idle'")
    args = parser.parse_args(argv)
    rounds_n = args.rounds or (1 if args.quick else 2)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    many = all_cores() >= MANY_CORES
    concurrency = [int(c) for c in (args.concurrency or ("1,8,32,128" if many else "1,8,32")).split(",")]
    args.instance_grid = args.instance_grid or ("auto" if many else "none")
    protocols = args.protocols.split(",") if args.protocols else ["http"]
    if args.protocols is None and grpc_available():
        protocols += ["grpc-unary", "grpc-stream"]
    unknown = set(protocols) - set(DRIVERS)
    if unknown:
        raise SystemExit(f"unknown protocols {sorted(unknown)}; choose from {sorted(DRIVERS)}")
    sets = {k: v for k, v in payload_sets(args.images).items() if k in args.payloads.split(",")}
    threads = args.threads or all_cores()
    env = {"LEVIT_MODEL": args.model, "LEVIT_MAX_BATCH_SIZE": str(args.max_batch_size)}
    if args.engine:
        env["LEVIT_ENGINE"] = args.engine
    if args.threads:
        env["LEVIT_THREADS"] = str(args.threads)
    env.update(item.split("=", 1) for item in args.env)
    print(
        f"{args.model}, engine {args.engine or 'auto'}, {threads} model threads, max batch {args.max_batch_size}"
        + (f", switch interval {args.switch_interval}s" if args.switch_interval else "")
        + (f", prelude {args.prelude!r}" if args.prelude else "")
        + (f", env {' '.join(args.env)}" if args.env else "")
        + "; "
        f"{all_cores()} cores; payloads: "
        + ", ".join(f"{k} ({len(v)} x ~{sum(len(p.data) for p in v) // len(v) // 1024} KiB)" for k, v in sets.items())
        + f"; load average {load_average()}",
        flush=True,
    )
    prelude = args.prelude
    if args.switch_interval:
        prelude = f"import sys\nsys.setswitchinterval({args.switch_interval!r})\n{prelude}"
    configs = parse_configs(args.configs)
    servers = {name: ServerProcess({**env, **extra}, prelude=prelude) for name, extra in configs.items()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` below: stop the servers
    rounds_by: dict[str, list[Round]] = {name: [] for name in configs}
    try:
        for name, server in servers.items():  # one at a time: compiling warm-ups would fight for the cores
            server.start()
            print(f"server {name} ({' '.join(f'{k}={v}' for k, v in configs[name].items()) or 'defaults'}): pid "
                  f"{server.pid}, log {server.log_path}; waiting for /readyz...", flush=True)  # fmt: skip
            print(f"ready after {server.wait_ready():.1f}s; {server_topology(server)}", flush=True)
        info = model_info(next(iter(servers.values())))  # the first server's dtype and measured choice of linears
        spec = EngineSpec(args.model, args.engine or "auto", args.max_batch_size, info["linears"], info["dtype"])
        model = ModelOnly(spec, threads, info["device"])  # on a GPU host the server is on the GPU
        print(
            f"model-only engine: {model.engine.kind} ({model.engine.linears} linears, {info['dtype']}), batch sizes "
            f"{model.batches}",
            flush=True,
        )
        shapes = grid_shapes(args.instance_grid, info)
        decode = {name: decode_ms(payloads, 0.5 if args.quick else 1.0) for name, payloads in sets.items()}
        print("decode + preprocess, 1 thread: " + ", ".join(f"{k} {v:.2f} ms" for k, v in decode.items()), flush=True)
        record = py_spy_recorder(args.py_spy, server.pid, seconds + args.warmup, args.py_spy_args.split())
        runner = asyncio.Runner(loop_factory=_loop_factory())
        for index in range(rounds_n):
            means, medians = model.measure(min_time=1.0 if not args.quick else 0.5)
            probe = Round(means, medians)
            serial = serial_pipeline(model, sets.get("photos") or next(iter(sets.values())), probe.best_batch, 2.0)
            print(
                f"round {index + 1}/{rounds_n}: model only "
                + ", ".join(
                    f"b={b} {probe.model_ips(b):.1f} img/s (mean {1000 * s:.1f} ms, "
                    f"median {1000 * probe.model_median[b]:.1f} ms)"
                    for b, s in probe.model.items()
                )
                + f"; serial pipeline (decode + b={probe.best_batch} forward, one thread of control) "
                f"{serial:.1f} img/s; load average {load_average()}",
                flush=True,
            )
            grid = measure_grid(shapes, spec, probe.best_batch, GRID_SECONDS) if shapes else {}
            if grid:
                print(f"  model only, processes x threads at b={probe.best_batch}: {describe(grid)}", flush=True)
            for name, server in servers.items():
                round_ = Round(means, medians, serial, grid)
                print(f" server {name}:", flush=True)
                runner.run(drive(server, sets, protocols, concurrency, args.warmup, seconds, round_, record))
                rounds_by[name].append(round_)
                if grid:  # now, not only in the final report: a run stopped by its time limit keeps it
                    print(grid_share_line(round_, protocols, max(concurrency)), flush=True)
        runner.close()
    finally:
        for server in servers.values():
            server.stop()
    passed = True
    for index, (name, rounds) in enumerate(rounds_by.items()):
        print(f"\n## server {name}: {' '.join(f'{k}={v}' for k, v in configs[name].items()) or 'defaults'}")
        passed &= report(rounds, model, threads, decode, list(sets), protocols, concurrency) or index > 0
    print(f"load average at the end {load_average()}")
    return 0 if passed else 1


def parse_configs(text: str) -> dict[str, dict[str, str]]:
    """'default;thread:LEVIT_INSTANCE_KIND=thread' -> {'default': {}, 'thread': {...}}."""
    configs: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, pairs = item.partition(":")
        configs[name] = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return configs


def model_info(server: ServerProcess) -> dict:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v1/model", timeout=10) as response:
        return json.loads(response.read())


def server_topology(server: ServerProcess) -> str:
    info = model_info(server)
    i = info.get("instances", {})
    return (
        f"engine {info['engine']} ({info.get('linears')} linears), {i.get('kind')}: {i.get('workers')} front-end(s), "
        f"{i.get('count')} instance(s) x {i.get('threads')} threads"
        + (" (splitting batches, sharing the threads)" if i.get("split_batches") else "")
    )


def report(
    rounds: list[Round],
    model: ModelOnly,
    threads: int,
    decode: dict[str, float],
    sets: list[str],
    protocols: list[str],
    concurrency: list[int],
) -> bool:
    best = median([r.model_ips(r.best_batch) for r in rounds])
    batch1 = median([1000 * r.model_median[1] for r in rounds])
    print(
        f"\nmodel only ({model.engine.kind}, {threads} threads, server idle): batch 1 median {batch1:.2f} ms; "
        + ", ".join(f"b={b} {b / s:.1f} img/s ({1000 * s:.1f} ms mean)" for b, s in model_means(rounds).items())
        + f"; best: {best:.1f} img/s"
    )
    table(rounds, sets, protocols, concurrency)
    budget(rounds, decode, threads, all_cores())
    return floors(rounds, protocols, concurrency)


def model_means(rounds: list[Round]) -> dict[int, float]:
    """Batch size -> median over rounds of the mean seconds per call."""
    return {b: median([r.model[b] for r in rounds]) for b in rounds[0].model}


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    raise SystemExit(main())
