"""10,000 mixed requests (valid, broken, oversize) over HTTP and gRPC: memory, fds and threads stay flat."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import httpx
import pytest

from service.client import ClientError, GrpcClient
from tests.conftest import photo, wait_until
from tests.corpus import cases
from tests.stress.procs import running

pytestmark = pytest.mark.stress
TOTAL = 10_000
UPLOAD_LIMIT = 256 * 1024


def mixed_requests() -> itertools.cycle:
    """A repeating pattern: 6 valid photos, 3 corpus refusals, 1 oversize body."""
    photos = [photo(n) for n in ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")]
    refused = [c for c in cases() if c.status != 200]
    oversize = b"\xff\xd8" + b"\0" * (UPLOAD_LIMIT + 1)
    pattern = []
    for i in range(len(refused)):
        pattern += [(f"p{j}.jpg", photos[(i + j) % 4], 200) for j in range(6)]
        pattern += [
            (refused[(3 * i + j) % len(refused)].name, refused[(3 * i + j) % len(refused)].data, None) for j in range(3)
        ]
        pattern.append(("big.jpg", oversize, 413))
    return itertools.cycle(pattern)


GRPC_STATUS = {200: "OK", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT"}


async def drive_grpc(target: str, count: int, concurrency: int = 4) -> dict[str, int]:
    statuses: dict[str, int] = {}
    requests = mixed_requests()
    async with GrpcClient(target) as client:

        async def worker(n: int) -> None:
            for _ in range(n):
                name, data, expected = next(requests)
                try:
                    await client.classify([(name, data)], timeout=60)
                    status = "OK"
                except ClientError as error:
                    status = error.status
                assert status not in ("INTERNAL", "UNKNOWN", "UNAVAILABLE"), (name, status)
                if expected is not None:
                    assert status == GRPC_STATUS[expected], (name, status)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
    return statuses


async def drive_both(url: str, target: str, count: int) -> tuple[dict[int, int], dict[str, int]]:
    return await asyncio.gather(drive(url, count // 2, 4), drive_grpc(target, count // 2))


async def drive(url: str, count: int, concurrency: int = 8) -> dict[int, int]:
    statuses: dict[int, int] = {}
    requests = mixed_requests()
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker(n: int) -> None:
            for _ in range(n):
                name, data, expected = next(requests)
                response = await client.post(url + "/classify", files={"img": (name, data)})
                assert response.status_code < 500, response.text
                if expected is not None:
                    assert response.status_code == expected, (name, response.status_code)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
    return statuses


@pytest.mark.timeout(900)  # a hang guard, not a speed limit: 10k requests take minutes on 2 busy cores
def test_soak_keeps_memory_fds_and_threads_flat() -> None:
    with running(LEVIT_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT), LEVIT_MAX_BATCH_SIZE="8") as server:
        target = f"127.0.0.1:{server.grpc_port}"
        asyncio.run(drive_both(server.url, target, 400))  # warm-up: pools, caches and allocator arenas settle
        fds, threads = server.fds(), server.threads()
        rss = server.rss_mib()
        http, grpc = asyncio.run(drive_both(server.url, target, TOTAL // 2))
        middle = server.rss_mib()
        http2, grpc2 = asyncio.run(drive_both(server.url, target, TOTAL // 2))
        end = server.rss_mib()
        http, grpc = dict(Counter(http) + Counter(http2)), dict(Counter(grpc) + Counter(grpc2))
        assert sum(http.values()) + sum(grpc.values()) == TOTAL
        assert http[200] + grpc["OK"] >= TOTAL // 2
        wait_until(lambda: server.fds() <= fds, timeout=30)  # client connections closed on our side
        print(
            f"soak: http {http}, grpc {grpc}, rss {rss:.0f} MiB -> +{middle - rss:.1f} MiB after {TOTAL // 2} "
            f"requests -> +{end - middle:.1f} MiB after {TOTAL // 2} more, fds {fds}, threads {threads}"
        )
        # A leak grows with the work done: the second half may not add what 5 KiB per request would (24 MiB).
        # The first half also settles what 400 warm-up requests did not (allocator arenas of the decoding
        # threads and of each model process: measured +27 to +52 MiB over a whole run with one model process,
        # +81 with the pair that splits batches, the default on 2 cores): bounded, but not by the leak rule.
        assert end - middle <= 24, f"memory grows with requests: +{end - middle:.1f} MiB in the second half"
        assert end - rss <= 150
        assert server.threads() == threads
