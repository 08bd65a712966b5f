"""levit-serve side by side with the servers users would pick instead, under one load generator.

    python -m bench.peers [--peers levit-serve,torchserve,torchserve-1w,litserve,mlserver,fastapi]
                          [--concurrency 1,8,32] [--rounds 3] [--seconds 5] [--warmup 2]
                          [--payloads photos,12MP] [--out .peers/report.md]

Every peer serves the same timm levit_128s checkpoint (`make peers-tools` installs the peers and writes
it) the way its own docs say, with its own batching on. Rounds are interleaved: in round r every peer is
started, its answers are checked against timm in process, it is driven at every payload set and
concurrency (bench.loadgen's closed loop, warm-up discarded), and stopped; then round r+1. So machine
drift hits all peers alike, and no idle peer shares the cores with the one being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import Payload, RawHttpDriver, RequestFailed, http_request
from bench.peers.measure import Level, measure_level
from bench.peers.peers import CHECKPOINT, HOST, PEERS, PEERS_DIR, Peer
from bench.peers.process import PeerFailed, PeerProcess
from bench.peers.reference import Check, Reference, check_answers, compute_reference, peer_answers
from bench.peers.report import cpu_model, environment_versions, first_errors, markdown, table
from bench.server import DEFAULT_IMAGES, payload_sets
from bench.timing import load_average

DEFAULT_OUT = PEERS_DIR / "report.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop clients per level, comma list")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over rounds reported)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each level")
    parser.add_argument("--payloads", default="photos,12MP", help="photos (tests/data/images) and/or 12MP")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report file")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=60.0,
        help="longest wait before each level for other processes to use < 0.25 cores (0: do not wait)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep every peer's scratch folder and log")
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.payloads = [p.strip() for p in args.payloads.split(",") if p.strip()]
    return args


def check_installed(peers: list[Peer], checkpoint: Path) -> None:
    missing = [str(p.python) for p in peers if not p.python.exists()]
    missing += [] if checkpoint.exists() else [str(checkpoint)]
    missing += [] if (PEERS_DIR / "torch" / "bin" / "python").exists() else [str(PEERS_DIR / "torch")]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}; run `make peers-tools` first")


def driver_for(peer: Peer, port: int, payloads: list[Payload]) -> RawHttpDriver:
    """The peer's requests built once; every connection's first answer is parsed (a 200 with garbage fails)."""
    requests = [http_request(HOST, port, *peer.request(p)) for p in payloads]

    def check(body: bytes) -> None:
        peer.answer(body)

    return RawHttpDriver(HOST, port, requests, check=check, name=peer.name)


def describe(process: PeerProcess) -> str:
    return f"pid {process.pid}, {len(process.tree())} processes"


@dataclass
class Run:
    """Everything one benchmark run collects, across peers and rounds."""

    args: argparse.Namespace
    sets: dict[str, list[Payload]]
    reference: Reference
    levels: list[Level] = field(default_factory=list)
    checks: dict[str, list[str]] = field(default_factory=dict)  # peer -> report lines
    failed: dict[str, str] = field(default_factory=dict)  # peer -> why it is not (or no longer) measured
    ready_s: dict[str, list[float]] = field(default_factory=dict)  # peer -> seconds to ready, per start


async def answers_check(process: PeerProcess, drivers: dict[str, RawHttpDriver], run: Run) -> Check:
    """The peer's answer to every payload, against the reference; a failed request fails the check."""
    peer, got = process.peer, {}
    try:
        for name, payloads in run.sets.items():
            got.update(await peer_answers(peer, drivers[name], payloads))
    except (OSError, ValueError, KeyError, RequestFailed, asyncio.IncompleteReadError) as error:
        return Check(False, [f"no valid answer: {type(error).__name__}: {error}"[:500]])
    return check_answers(peer, got, run.reference)


async def drive(process: PeerProcess, run: Run, round_index: int) -> Check:
    """Check the peer's answers on every payload; when they pass, run every level on it."""
    peer, args = process.peer, run.args
    drivers = {name: driver_for(peer, process.port, payloads) for name, payloads in run.sets.items()}
    check = await answers_check(process, drivers, run)
    print(f"  answers {'PASS' if check.passed else 'FAIL'}:", flush=True)
    for line in check.lines:
        print(f"    {line}", flush=True)
    if not check.passed:
        return check
    for name, payloads in run.sets.items():
        for c in args.concurrency:
            level = await measure_level(
                peer.name,
                drivers[name],
                len(payloads),
                c,
                args.warmup,
                args.seconds,
                process.cpu_seconds,
                name,
                round_index,
                quiet_timeout=args.quiet_timeout,
            )
            run.levels.append(level)
            print_level(level)
    return check


def print_level(level: Level) -> None:
    r = level.result
    print(
        f"    {level.payloads:<6} c={level.concurrency:<3} {level.images_per_s:7.1f} img/s  "
        f"p50 {r.percentile_ms(50):7.1f}  p90 {r.percentile_ms(90):7.1f}  p99 {r.percentile_ms(99):7.1f} ms  "
        f"server CPU {level.cpu_ms_per_image:6.1f} ms/img  loadgen CPU {100 * r.client_cpu:3.0f}%  "
        f"other processes {100 * level.other_cores:3.0f}%"
        + (f" (waited {level.waited_s:.0f} s for quiet)" if level.waited_s > 1.5 else "")
        + (f"  {r.errors} errors, first: {r.first_error}" if r.errors else ""),
        flush=True,
    )


def run_peer(peer: Peer, run: Run, round_index: int, runner: asyncio.Runner) -> None:
    """Start the peer, check and measure it, stop it (its scratch folder is kept when something failed)."""
    process = PeerProcess(peer, run.args.checkpoint.resolve())
    keep = run.args.keep_logs
    try:
        process.start()
        run.ready_s.setdefault(peer.name, []).append(process.wait_ready())
        print(
            f"round {round_index}/{run.args.rounds}: {peer.name} ready in {run.ready_s[peer.name][-1]:.1f} s "
            f"({describe(process)}, log {process.log_path})",
            flush=True,
        )
        check = runner.run(drive(process, run, round_index))
        run.checks.setdefault(peer.name, []).append(f"round {round_index}: {'PASS' if check.passed else 'FAIL'}")
        run.checks[peer.name] += [f"  {line}" for line in check.lines]
        if not check.passed:
            run.failed[peer.name] = "answers differ from the reference: not timed"
            keep = True
    except PeerFailed as error:
        run.failed[peer.name] = str(error).splitlines()[0]
        print(f"round {round_index}: {error}", flush=True)
        keep = True
    finally:
        process.stop(keep_workdir=keep)
        if keep:
            print(f"  kept {process.launch.workdir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.peers", *(sys.argv[1:] if argv is None else argv)])
    peers = [PEERS[name] for name in args.peers]
    check_installed(peers, args.checkpoint)
    sets = {k: v for k, v in payload_sets(args.images).items() if k in args.payloads}
    if not sets:
        raise SystemExit(f"no payload set among {args.payloads}; choose from photos, 12MP")
    all_payloads = [p for payloads in sets.values() for p in payloads]
    reference = compute_reference(PEERS_DIR / "torch" / "bin" / "python", args.checkpoint, all_payloads)
    versions = {p.name: environment_versions(p) for p in peers}
    machine = cpu_model()
    print(f"{command}\nmachine: {machine}; load average {load_average()}", flush=True)
    print(f"reference (timm in process, {reference.versions}):", flush=True)
    for name, (indices, _) in reference.answers.items():
        print(f"  {name}: top-5 {indices}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s: stop the peer
    run = Run(args, sets, reference)
    started = time.monotonic()
    with asyncio.Runner() as runner:
        for round_index in range(1, args.rounds + 1):
            for peer in peers:
                if peer.name not in run.failed:
                    run_peer(peer, run, round_index, runner)
    text = markdown(
        command=command,
        machine=machine,
        minutes=(time.monotonic() - started) / 60,
        settings=settings_line(args, sets),
        rows=table(run.levels, [p.name for p in peers], list(sets), args.concurrency),
        errors=first_errors(run.levels),
        failed=run.failed,
        peers=peers,
        versions=versions,
        ready_s=run.ready_s,
        reference=f"timm in process, batch 1 ({', '.join(f'{k} {v}' for k, v in reference.versions.items())}); "
        f"checkpoint {args.checkpoint}",
        checks=run.checks,
    )
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 1 if run.failed else 0


def settings_line(args: argparse.Namespace, sets: dict[str, list[Payload]]) -> str:
    return (
        "Payloads: "
        + ", ".join(f"{k} ({len(v)} x ~{sum(len(p.data) for p in v) // len(v) // 1024} KiB)" for k, v in sets.items())
        + f". {args.rounds} interleaved round(s); per level {args.warmup:g} s warm-up (discarded) + "
        f"{args.seconds:g} s measured; concurrency {', '.join(map(str, args.concurrency))} (closed loop, "
        "bench.loadgen, one image per request)."
    )


if __name__ == "__main__":
    raise SystemExit(main())
