"""The benchmark's load generator reads responses the way the servers it measures send them.

bench.peers drives TorchServe, LitServe, MLServer and FastAPI with the same `RawHttpDriver`; a parser that
misread a chunked body or accepted a response without a length would count garbage as served images.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import RequestFailed, http_request, read_http_response, run_level


def _read(raw: bytes) -> tuple[bytes, bytes]:
    async def go() -> tuple[bytes, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_http_response(reader)

    return asyncio.run(go())


def test_content_length_body() -> None:
    raw = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 9\r\n\r\n{"a": 12}'
    assert _read(raw) == (b"200", b'{"a": 12}')


def test_chunked_body_is_reassembled() -> None:
    raw = b'HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n6;ext=1\r\n: 12}\n\r\n0\r\n\r\n'
    assert _read(raw) == (b"503", b'{"a": 12}\n')


def test_response_without_length_is_a_failure() -> None:
    with pytest.raises(RequestFailed, match="no Content-Length"):
        _read(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody")


def test_request_carries_its_body_and_length() -> None:
    request = http_request("127.0.0.1", 8080, "POST", "/predictions/levit", "image/jpeg", b"\xff\xd8jpeg")
    head, body = request.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /predictions/levit HTTP/1.1\r\n")
    assert b"Content-Length: 6" in head.split(b"\r\n") and body == b"\xff\xd8jpeg"


class _SlowClient:
    """Answers every call after `latency` seconds: a closed loop of C such clients serves C / latency calls/s."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    async def call(self, index: int) -> None:
        await asyncio.sleep(self.latency)

    async def close(self) -> None:
        pass


class _SlowDriver:
    name = "slow"

    def __init__(self, latency: float) -> None:
        self.latency = latency

    async def connect(self) -> _SlowClient:
        return _SlowClient(self.latency)


def test_throughput_counts_every_call_completed_in_the_window() -> None:
    """With answers taking 1/4 of the window, counting only calls that also *started* in it reported 3/4 of the
    rate (what bench.server did until 2026-12-06); every completion in the window gives the closed loop's rate."""
    latency, clients, window = 0.25, 4, 1.0
    result = asyncio.run(run_level(_SlowDriver(latency), 1, clients, 0.375, window))  # ends 1/8 s from any answer
    expected = clients / latency  # 16 calls/s
    assert 0.9 * expected <= result.images_per_s <= 1.1 * expected, result.images_per_s
    assert result.percentile_ms(50) == pytest.approx(1000 * latency, rel=0.2)
