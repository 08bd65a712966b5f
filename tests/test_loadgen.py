"""The benchmark's load generator reads responses the way the servers it measures send them.

bench.peers drives TorchServe, LitServe, MLServer and FastAPI with the same `RawHttpDriver`; a parser that
misread a chunked body or accepted a response without a length would count garbage as served images.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import RequestFailed, http_request, read_http_response


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
