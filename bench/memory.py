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
import sys
import time
from pathlib import Path

from bench.server import ServerProcess, parse_configs
from bench.startup import cpu_model


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
    server = ServerProcess(env)
    server.start()
    try:
        ready = server.wait_ready(poll=0.05)
        time.sleep(settle)
        sizes: dict[str, float] = {}
        for pid in server.pids():
            name = "supervisor" if pid == server.pid else name_of(pid)
            sizes[name] = sizes.get(name, 0.0) + pss_mb(pid)
        return ready, sizes
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default", help="name[:LEVIT_X=v,...];... (default: the defaults)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after ready before measuring")
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs).items()
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
