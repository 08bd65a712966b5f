"""The server's memory after start-up: PSS of every process of `python -m service`, per configuration.

    python -m bench.memory [--configs "default;onednn:LEVIT_LINEARS=onednn"] [--repeat 2] [--settle 3]

PSS (proportional set size, from /proc/PID/smaps_rollup) splits pages shared between processes (the mapped
engine libraries, the shared ring) among them, so the sum over processes is what the server costs the machine,
and what a container's memory limit must hold. Each configuration is started `--repeat` times, interleaved
with the others so that drift hits all alike; random weights, the default engine (found in the artifact cache,
as a restarted pod finds it), measured `--settle` seconds after /readyz turns 200, before any request.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.procs import free_port, process_tree
from bench.startup import cpu_model

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 900.0


def pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return sum(int(line.split()[1]) for line in rollup if line.startswith("Pss:")) / 1024
    except OSError:
        return 0.0


def name_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def measure(env: dict[str, str], settle: float) -> tuple[float, dict[str, float]]:
    """Seconds to ready and PSS (MB) by process name for one start of the server."""
    port = free_port()
    full = {**os.environ, "LEVIT_WEIGHTS": "random", "LEVIT_HTTP_PORT": str(port), "LEVIT_GRPC_PORT": "0", **env}
    start = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=full, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode} before it was ready")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise SystemExit("server not ready in time")
            time.sleep(0.05)
        ready = time.monotonic() - start
        time.sleep(settle)
        sizes: dict[str, float] = {}
        for pid in process_tree(server.pid):
            name = "supervisor" if pid == server.pid else name_of(pid)
            sizes[name] = sizes.get(name, 0.0) + pss_mb(pid)
        return ready, sizes
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def parse_configs(text: str) -> list[tuple[str, dict[str, str]]]:
    configs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, assignments = part.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        configs.append((name, env))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default", help="name[:LEVIT_X=v,...];... (default: the defaults)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after ready before measuring")
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs)
    print(f"{cpu_model()}, {os.cpu_count()} cores; PSS in MB, {args.settle:.0f} s after ready", flush=True)
    rows: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name, _ in configs}
    for _ in range(args.repeat):
        for name, env in configs:
            ready, sizes = measure(env, args.settle)
            rows[name].append((ready, sizes))
            parts = "  ".join(f"{k} {v:.0f}" for k, v in sorted(sizes.items()))
            print(f"{name}: ready {ready:.2f} s, total {sum(sizes.values()):.0f}  ({parts})", flush=True)
    print("\n| configuration | total PSS per start | time to ready |\n|---|---|---|")
    for name, runs in rows.items():
        totals = ", ".join(f"{sum(s.values()):.0f} MB" for _, s in runs)
        print(f"| {name} | {totals} | {', '.join(f'{r:.2f} s' for r, _ in runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
