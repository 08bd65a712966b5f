"""Time to ready: `python -m service` from process start to `/readyz` 200, per engine, cold and warm.

    python -m bench.startup [--engines auto,compile,trace,eager] [--model LeViT_128S] [--repeat 1]

cold = empty artifact folder (LEVIT_ENGINE_PATH) and empty Inductor cache (TORCHINDUCTOR_CACHE_DIR);
warm = the same folders again, as a restarted pod finds its volume or image. `compile` is the in-process
Inductor engine (the default before the AOT artifact: five batch buckets compiled at every start);
`trace` and `eager` need no compiler and no cache. Random weights, the default process model, max batch
16; the CPU model is printed with the figures. Floor (issue 13): warm start of the default engine <= 15 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
WARM_FLOOR_S = 15.0
READY_TIMEOUT_S = 900.0


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def time_to_ready(engine: str, model: str, engines: Path, inductor: Path) -> tuple[float, dict]:
    """Seconds from spawn to the first `/readyz` 200, and `/v1/model` then; the server is stopped after."""
    http = free_port()
    env = {
        **os.environ,
        "LEVIT_ENGINE": engine,
        "LEVIT_MODEL": model,
        "LEVIT_WEIGHTS": "random",
        "LEVIT_HOST": "127.0.0.1",
        "LEVIT_HTTP_PORT": str(http),
        "LEVIT_GRPC_PORT": str(free_port()),
        "LEVIT_ENGINE_PATH": str(engines),
        "LEVIT_LOG_LEVEL": "WARNING",
        "TORCHINDUCTOR_CACHE_DIR": str(inductor),
    }
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f}s")
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        ready = time.monotonic() - start
        return ready, httpx.get(url + "/v1/model", timeout=5).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="auto,compile,trace,eager")
    parser.add_argument("--model", default="LeViT_128S")
    parser.add_argument("--repeat", type=int, default=1, help="warm starts per engine (median reported)")
    args = parser.parse_args(argv)
    print(f"time to ready, {args.model}, {os.cpu_count()} cores, {cpu_model()}", flush=True)
    rows = []
    for engine in args.engines.split(","):
        scratch = Path(tempfile.mkdtemp(prefix=f"levit-startup-{engine}-"))
        try:
            engines, inductor = scratch / "engines", scratch / "inductor"
            cold, info = time_to_ready(engine, args.model, engines, inductor)
            warm = sorted(time_to_ready(engine, args.model, engines, inductor)[0] for _ in range(args.repeat))
            artifact = info.get("engine_artifact") or {}
            rows.append((engine, info["engine"], cold, warm[len(warm) // 2], artifact.get("build_s")))
            print(f"  {engine}: cold {cold:.1f}s, warm {warm[len(warm) // 2]:.1f}s (serving {info['engine']})",
                  flush=True)  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n| LEVIT_ENGINE | serves | cold start to ready | warm start to ready | artifact build |")
    print("|---|---|---|---|---|")
    for engine, serves, cold, warm, build_s in rows:
        print(f"| {engine} | {serves} | {cold:.1f} s | {warm:.1f} s | {f'{build_s:.1f} s' if build_s else '-'} |")
    default = next((r for r in rows if r[0] == "auto"), None)
    if default is None:
        return 0
    passed = default[3] <= WARM_FLOOR_S
    print(f"{'PASS' if passed else 'FAIL'}: warm start of the default engine (auto) {default[3]:.1f}s "
          f"(floor {WARM_FLOOR_S:.0f}s)", end="")  # fmt: skip
    compiled = next((r for r in rows if r[0] == "compile"), None)
    if compiled:
        print(f"; cold {default[2]:.1f}s against the in-process compile engine's cold {compiled[2]:.1f}s "
              f"and warm {compiled[3]:.1f}s", end="")  # fmt: skip
    print()
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
