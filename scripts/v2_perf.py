"""`make test-v2-perf`: Triton's perf_analyzer against a real levit-serve over the Open Inference Protocol.

    python scripts/v2_perf.py [--engine trace] [--concurrency 1:4] [--requests 30] [--batch 1]
                              [--protocols http,grpc] [--image tests/data/images/cat.jpg]
                              [--perf-analyzer .tools/bin/perf_analyzer]

Starts `python -m service` (random weights, free loopback ports, LEVIT_MAX_BATCH_SIZE 16 unless set), waits
for /v2/health/ready, then runs perf_analyzer (scripts/v2_tools.sh installs it into .tools/) with a BYTES
`image` input holding one encoded JPEG per request, in count_windows mode (bounded: `--requests` per window,
at most 5 windows per concurrency). Prints each exact command and a markdown table (docs/v2.md has one), and
exits non-zero if perf_analyzer fails.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERF_ANALYZER = ROOT / ".tools" / "bin" / "perf_analyzer"
DEFAULT_IMAGE = ROOT / "tests" / "data" / "images" / "cat.jpg"
MODEL = "levit"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def input_data(image: Path, directory: Path) -> Path:
    """perf_analyzer's --input-data JSON: `b64` holds the tensor's bytes as sent, for BYTES the serialized
    form (uint32 little-endian length, then the element), here one element: the encoded image."""
    raw = image.read_bytes()
    path = directory / "input.json"
    element = base64.b64encode(struct.pack("<I", len(raw)) + raw).decode()
    path.write_text(json.dumps({"data": [{"image": {"b64": element}}]}))
    return path


def command(
    protocol: str, port: int, data: Path, args: argparse.Namespace, concurrency: str, csv_path: Path
) -> list[str]:
    return [
        str(args.perf_analyzer),
        "-m", MODEL,
        "-i", protocol,
        "-u", f"127.0.0.1:{port}",
        "-b", str(args.batch),
        "--input-data", str(data),
        "--concurrency-range", concurrency,
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(args.requests),
        "--stability-percentage", "50",
        "--max-trials", "5",
        "-f", str(csv_path),
    ]  # fmt: skip


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="trace", help="LEVIT_ENGINE of the server (default trace)")
    parser.add_argument(
        "--concurrency", default="1:4", help="perf_analyzer --concurrency-range, comma-separated for several runs"
    )
    parser.add_argument("--requests", type=int, default=30, help="requests per measurement window (default 30)")
    parser.add_argument("--batch", type=int, default=1, help="images per request, perf_analyzer -b (default 1)")
    parser.add_argument("--protocols", default="http,grpc")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--perf-analyzer", type=Path, default=PERF_ANALYZER)
    args = parser.parse_args(argv)
    if not args.perf_analyzer.exists():
        raise SystemExit(f"{args.perf_analyzer} is missing: run scripts/v2_tools.sh perf")

    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "LEVIT_WEIGHTS": "random",
        "LEVIT_ENGINE": args.engine,
        "LEVIT_HOST": "127.0.0.1",
        "LEVIT_HTTP_PORT": str(http_port),
        "LEVIT_GRPC_PORT": str(grpc_port),
        "LEVIT_LOG_LEVEL": "WARNING",
    }
    env.setdefault("LEVIT_MAX_BATCH_SIZE", "16")
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env)
    rows = []
    try:
        wait_ready(f"http://127.0.0.1:{http_port}", server, args.ready_timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/model", timeout=10) as response:
            info = json.load(response)
        with tempfile.TemporaryDirectory() as tmp:
            data = input_data(args.image, Path(tmp))
            for protocol in args.protocols.split(","):
                port = http_port if protocol == "http" else grpc_port
                for i, concurrency in enumerate(args.concurrency.split(",")):
                    csv_path = Path(tmp) / f"{protocol}{i}.csv"
                    cmd = command(protocol, port, data, args, concurrency, csv_path)
                    print("$", shlex.join(cmd).replace(tmp, "$TMP"), flush=True)
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                    if done.returncode != 0:
                        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
                        raise SystemExit(f"perf_analyzer ({protocol}) failed with status {done.returncode}")
                    with csv_path.open() as f:
                        rows.extend((protocol, row) for row in csv.DictReader(f))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    print(
        f"\n{info['name']} on {info['device']} ({info['dtype']}, engine {info['engine']}), max batch "
        f"{info['batching']['max_batch_size']}; -b {args.batch}, image {args.image.name}, {os.cpu_count()} CPUs\n"
    )
    print("| protocol | concurrency | infer/s | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for protocol, row in rows:
        ms = {key: int(row[f"{key} latency"]) / 1000 for key in ("p50", "p90", "p99")}
        print(
            f"| {protocol} | {row['Concurrency']} | {float(row['Inferences/Second']):.1f} | "
            f"{ms['p50']:.1f} | {ms['p90']:.1f} | {ms['p99']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
