"""The markdown report: one row per (peer, payload set, concurrency), medians over rounds, and what was run where."""

from __future__ import annotations

import json
import os
import statistics
import subprocess

from bench import startup
from bench.peers.measure import Level
from bench.peers.peers import Peer

TORCH_PACKAGES = ("torch", "torchvision", "timm")


def cpu_model() -> str:
    """The CPU's name (bench.startup reads it) and how many cores this process may use."""
    return f"{startup.cpu_model()}, {len(os.sched_getaffinity(0))} cores usable"


def environment_versions(peer: Peer) -> dict[str, str]:
    """Versions in the peer's own venv, asked of its interpreter (the shared torch shows up there)."""
    names = [*TORCH_PACKAGES, *peer.packages]
    code = (
        "import json, sys, importlib.metadata as m\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([str(peer.python), "-c", code, *names], capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout)


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def _percentile_ms(level: Level, q: int) -> float:
    return level.result.percentile_ms(q)


def table(levels: list[Level], peers: list[str], sets: list[str], concurrency: list[int]) -> list[str]:
    """Rows of medians over rounds; at the highest concurrency levit-serve's img/s over the best other peer's."""
    top = max(concurrency)

    def group(peer: str, name: str, c: int) -> list[Level]:
        return [x for x in levels if (x.peer, x.payloads, x.concurrency) == (peer, name, c)]

    def ips(peer: str, name: str, c: int) -> float:
        return _median([x.images_per_s for x in group(peer, name, c)])

    rows = [
        "| peer | payload | clients | img/s | p50 ms | p90 ms | p99 ms | errors | server CPU ms/img "
        f"| levit-serve / best peer (c={top}) | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sets:
        for peer in peers:
            for c in concurrency:
                runs = group(peer, name, c)
                if not runs:
                    continue
                cells = [_median([_percentile_ms(x, q) for x in runs]) for q in (50, 90, 99)]
                ratio = ""
                if peer == "levit-serve" and c == top:
                    others = {p: ips(p, name, c) for p in peers if p != peer and group(p, name, c)}
                    if others:
                        best = max(others, key=lambda p: others[p])
                        ratio = f"{ips(peer, name, c) / others[best]:.2f}x ({best})"
                rows.append(
                    f"| {peer} | {name} | {c} | {ips(peer, name, c):.1f} | "
                    + " | ".join(f"{v:.1f}" for v in cells)
                    + f" | {sum(x.errors for x in runs)} | {_median([x.cpu_ms_per_image for x in runs]):.1f}"
                    + f" | {ratio} | {100 * _median([x.other_cores for x in runs]):.0f}% |"
                )
    return rows


def first_errors(levels: list[Level]) -> list[str]:
    return [
        f"- {x.peer} {x.payloads} c={x.concurrency} round {x.round}: {x.errors} errors, first: {x.result.first_error}"
        for x in levels
        if x.errors
    ]


def markdown(
    *,
    command: str,
    machine: str,
    minutes: float,
    settings: str,
    rows: list[str],
    errors: list[str],
    failed: dict[str, str],
    peers: list[Peer],
    versions: dict[str, dict[str, str]],
    ready_s: dict[str, list[float]],
    reference: str,
    checks: dict[str, list[str]],
) -> str:
    """The whole report: what ran where, the table, how to read it, each peer's setup and answer checks."""
    from bench.timing import load_average

    out = [
        "# levit-serve and the servers users would pick instead",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Load average at the end: {load_average()}. Run took {minutes:.1f} min.",
        "",
        settings,
        "",
        *rows,
        "",
        "img/s: responses completed inside the measured window / its length (median over rounds). p50/p90/p99: "
        "latencies of the requests that completed inside the window (bench.loadgen.run_level), median over "
        "rounds. Server CPU: user + system seconds of the peer's whole process tree (/proc) inside the window / "
        "images completed in it. Errors: summed over rounds. Other CPU: what processes other than the peer and "
        "the load generator used during the window (median over rounds, 100% = one core): high values mean a "
        "disturbed measurement.",
        "",
    ]
    if errors:
        out += ["Errors:", "", *errors, ""]
    if failed:
        out += ["Not measured:", "", *(f"- {k}: {v}" for k, v in failed.items()), ""]
    out += [
        "## Peers",
        "",
        "| peer | setup | versions | ready after (s) |",
        "|---|---|---|---|",
        *(
            f"| {p.name} | {p.setup} | {', '.join(f'{k} {v}' for k, v in versions[p.name].items())} | "
            f"{', '.join(f'{s:.0f}' for s in ready_s.get(p.name, []))} |"
            for p in peers
        ),
        "",
        f"Reference: {reference}.",
        "",
        "## Answer checks (top-5 indices equal to the reference; levit-serve: top-1 equal, top-5 overlap)",
        "",
        *(f"- {name}:\n" + "\n".join(f"    {line}" for line in lines) for name, lines in checks.items() if lines),
        "",
    ]
    return "\n".join(out)
