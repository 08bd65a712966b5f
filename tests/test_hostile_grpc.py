"""The hostile corpus over gRPC: each case gets its documented status, valid calls beside it all succeed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from service.client import ClientError, GrpcClient
from tests.conftest import ServerThread, photo, wait_until
from tests.corpus import cases
from tests.helpers import metric, scrape

GRPC_STATUS = {200: "OK", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT"}
CAT = photo("cat.jpg")


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    server = ServerThread(max_upload_bytes=2 * 1024 * 1024, max_batch_size=8).start()
    wait_until(lambda: server.server.grpc_port is not None)
    yield server
    server.stop()


async def _outcome(client: GrpcClient, name: str, data: bytes) -> tuple[str, str]:
    try:
        result = await client.classify([(name, data)], timeout=60)
    except ClientError as error:
        return error.status, error.message
    assert result.results[0].filename == name and len(result.results[0].predictions) == 5
    return "OK", ""


def _server_errors(samples: dict) -> float:
    name = "levit_request_duration_seconds_count"
    return sum(metric(samples, name, protocol="grpc", status=s) for s in ("INTERNAL", "UNKNOWN"))


def test_corpus_over_grpc_with_parallel_valid_calls(srv: ServerThread) -> None:
    errors_before = _server_errors(scrape(srv.url))  # the registry is process-wide: compare with before

    async def run() -> None:
        async with GrpcClient(f"127.0.0.1:{srv.server.grpc_port}") as client:
            expected = [p.index for p in (await client.classify([("cat.jpg", CAT)])).results[0].predictions]
            valid = [client.classify([(f"v{i}.jpg", CAT)], timeout=60) for i in range(30)]
            hostile = [_outcome(client, c.name, c.data) for c in cases()]
            results = await asyncio.gather(*valid, *hostile)
            for answer in results[:30]:
                assert [p.index for p in answer.results[0].predictions] == expected
            for case, (status, message) in zip(cases(), results[30:]):
                assert status == GRPC_STATUS[case.status], (case.name, status, message)
                if status != "OK":
                    assert case.name in message

            # request-level abuse: too many images, too large a message, bad top_k
            for images, k, status in [
                ([(f"{i}.jpg", b"x") for i in range(100)], None, "RESOURCE_EXHAUSTED"),
                ([("big.jpg", b"\xff\xd8" + b"\0" * 3_000_000)], None, "RESOURCE_EXHAUSTED"),
                ([], None, "INVALID_ARGUMENT"),
                ([("cat.jpg", CAT)], 0, "INVALID_ARGUMENT"),
                ([("cat.jpg", CAT)], 1001, "INVALID_ARGUMENT"),
            ]:
                with pytest.raises(ClientError) as info:
                    await client.classify(images, k=k, timeout=60)
                assert info.value.status == status, (len(images), k, info.value)

    asyncio.run(run())
    assert _server_errors(scrape(srv.url)) == errors_before
