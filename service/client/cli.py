"""`levit-client`: classify image files, or show the model, over gRPC or HTTP.

    levit-client classify cat.jpg dog.png --grpc localhost:50051 -k 3
    levit-client classify cat.jpg --http http://localhost:8000 --json
    levit-client model --grpc localhost:50051

Exit status: 0 on success, 1 when the server refused or failed the request (its message is printed), or could
not be reached, 2 on a usage error (unknown flag, unreadable file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from service.client.api import ClientError, read_images
from service.results import Classification

DEFAULT_HTTP = "http://localhost:8000"
PROG = "levit-client"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Classify images with a levit-serve server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_target(sub: argparse.ArgumentParser) -> None:
        target = sub.add_mutually_exclusive_group()
        target.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC, e.g. localhost:50051")
        target.add_argument("--http", metavar="URL", help=f"use HTTP (the default, at {DEFAULT_HTTP})")
        sub.add_argument("--json", action="store_true", help="print the response as JSON (the HTTP API's shape)")

    classify = commands.add_parser("classify", help="classify image files", description="Classify image files.")
    classify.add_argument("files", nargs="+", metavar="FILE", help="JPEG, PNG, WebP, GIF, BMP or TIFF files")
    classify.add_argument("-k", type=int, default=None, help="predictions per image (server default: 5)")
    classify.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="deadline (server default: 10 s)"
    )
    add_target(classify)
    model = commands.add_parser("model", help="show the model being served", description="Show the model.")
    add_target(model)
    return parser


def table(result: Classification) -> str:
    rows = [("FILE", "RANK", "LABEL", "SCORE")]
    for image in result.results:
        for rank, p in enumerate(image.predictions, 1):
            rows.append((image.filename, str(rank), p.label, f"{p.score:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"{file:<{widths[0]}}  {rank:>{widths[1]}}  {label:<{widths[2]}}  {score:>{widths[3]}}"
        for file, rank, label, score in rows
    ]
    note = "  (random weights: predictions are meaningless)" if result.weights.startswith("random") else ""
    lines.append(f"model {result.model}, weights {result.weights}{note}")
    return "\n".join(lines)


async def _run(args: argparse.Namespace, images: list[tuple[str, bytes]]) -> Any:
    if args.grpc:
        from service.client.grpc_client import GrpcClient

        client: Any = GrpcClient(args.grpc)
    else:
        from service.client.http_client import HttpClient

        client = HttpClient(args.http or DEFAULT_HTTP)
    async with client:
        if args.command == "model":
            return await client.model()
        return await client.classify(images, args.k, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    images: list[tuple[str, bytes]] = []
    if args.command == "classify":
        try:
            images = read_images(args.files)
        except OSError as error:
            parser.error(f"cannot read {error.filename}: {error.strerror}")
    try:
        result = asyncio.run(_run(args, images))
    except ClientError as error:
        reason = f" ({error.reason})" if error.reason else ""
        print(f"{PROG}: {error.status}{reason}: {error.message}", file=sys.stderr)
        return 1
    if isinstance(result, Classification):
        text = json.dumps(result.to_json(), indent=2) if args.json else table(result)
    else:
        text = json.dumps(result, indent=2)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `levit-client ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
