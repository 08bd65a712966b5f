"""A cheap closed-loop load generator: N virtual clients, each with one request in flight.

It shares the machine's cores with the server it measures, so per request it does as little as
possible: request bodies are built once, HTTP goes over raw asyncio streams with keep-alive (one
connection per virtual client) and a response is parsed only as far as its status line and length
headers (the body is JSON-parsed once per connection, as a check). gRPC sends pre-serialized messages (no
per-call protobuf work) over one channel per virtual client, unary or one long-lived stream per client.

A protocol is a `Driver`: `connect()` returns a `Client` whose `call(payload_index)` sends one
request and returns when its full response has arrived (raising on anything but success). Adding a
protocol is adding a driver to `DRIVERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import resource
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Payload:
    """One image file as a client would upload it."""

    filename: str
    data: bytes
    content_type: str = "image/jpeg"


class Client(Protocol):
    async def call(self, index: int) -> None: ...

    async def close(self) -> None: ...


class Driver(Protocol):
    name: str

    async def connect(self) -> Client: ...


class RequestFailed(Exception):
    pass


# --- HTTP/1.1 over raw asyncio streams -------------------------------------------------------------------


def multipart_body(payload: Payload, field_name: str = "img") -> tuple[str, bytes]:
    """Content type and body of a one-file multipart/form-data upload."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        (
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="{field_name}"; filename="{payload.filename}"\r\n'.encode(),
            f"Content-Type: {payload.content_type}\r\n\r\n".encode(),
            payload.data,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    return f"multipart/form-data; boundary={boundary}", body


def multipart_request(host: str, port: int, payload: Payload, field_name: str = "img") -> bytes:
    """A complete `POST /classify` request (headers and multipart body) for one image, keep-alive."""
    return http_request(host, port, "POST", "/classify", *multipart_body(payload, field_name))


def http_request(host: str, port: int, method: str, path: str, content_type: str, body: bytes) -> bytes:
    """A complete keep-alive HTTP/1.1 request with a fixed body: what `RawHttpDriver` sends as is."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: levit-bench\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_http_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Status code and body of one response; Content-Length or chunked (some servers stream JSON)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, length, chunked = head[9:12], -1, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        await reader.readuntil(b"\r\n")  # no trailers are sent by the servers measured here
        return status, b"".join(parts)
    if length < 0:
        raise RequestFailed(f"no Content-Length in response: {head[:200]!r}")
    return status, await reader.readexactly(length)


class RawHttpClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: Sequence[bytes],
        check: Callable[[bytes], None] | None,
    ) -> None:
        self.reader, self.writer, self.requests, self.check = reader, writer, requests, check

    async def fetch(self, index: int) -> bytes:
        """Send request `index`, return the body of a 200 response (anything else raises)."""
        self.writer.write(self.requests[index])
        status, body = await read_http_response(self.reader)
        if status != b"200":
            raise RequestFailed(f"HTTP {status.decode(errors='replace')}: {body[:300]!r}")
        return body

    async def call(self, index: int) -> None:
        body = await self.fetch(index)
        if self.check is not None:  # once per connection: the body really is an answer
            check, self.check = self.check, None
            check(body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class RawHttpDriver:
    """Any HTTP server: one pre-built request per payload (`http_request`), sent as is over keep-alive.

    A response counts when its status is 200; `check` (optional) validates the first body of each
    connection, so a server answering 200 with garbage does not pass unnoticed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        requests: Sequence[bytes],
        check: Callable[[bytes], None] | None = None,
        name: str = "http-raw",
    ) -> None:
        self.host, self.port, self.requests, self.check, self.name = host, port, list(requests), check, name

    async def connect(self) -> RawHttpClient:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return RawHttpClient(reader, writer, self.requests, self.check)


def _has_predictions(body: bytes) -> None:
    if not json.loads(body)["results"][0]["predictions"]:
        raise RequestFailed(f"no predictions in {body[:300]!r}")


def http_driver(host: str, port: int, payloads: Sequence[Payload]) -> RawHttpDriver:
    """levit-serve's `POST /classify`, multipart; each connection's first answer must hold predictions."""
    requests = [multipart_request(host, port, p) for p in payloads]
    return RawHttpDriver(host, port, requests, check=_has_predictions, name="http")


# --- gRPC (service/grpc/gen stubs) -----------------------------------------------------------------------

GRPC_STUBS = "service.grpc.gen.levit.v1.classifier_pb2"


def grpc_available() -> bool:
    try:
        return importlib.util.find_spec(GRPC_STUBS) is not None
    except ModuleNotFoundError:
        return False


_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, i.e. per virtual client
]


class GrpcUnaryClient:
    def __init__(self, channel: object, call: Callable, requests: Sequence[bytes], parse: Callable) -> None:
        self.channel, self._call, self.requests, self._parse = channel, call, requests, parse
        self.checked = False

    async def call(self, index: int) -> None:
        reply = await self._call(self.requests[index])
        if not self.checked:
            self.checked = True
            if not self._parse(reply).results[0].predictions:
                raise RequestFailed("no predictions in the gRPC response")

    async def close(self) -> None:
        await self.channel.close()


class GrpcStreamClient:
    """One ClassifyStream per virtual client, one request in flight on it (closed loop, like the others)."""

    def __init__(self, channel: object, stream: object, requests: Sequence[bytes], parse: Callable) -> None:
        self.channel, self.stream, self.requests, self._parse = channel, stream, requests, parse
        self.checked = False

    async def call(self, index: int) -> None:
        await self.stream.write(self.requests[index])
        reply = await self.stream.read()
        if not isinstance(reply, bytes):
            raise RequestFailed(f"stream ended: {await self.stream.code()} {await self.stream.details()}")
        message = self._parse(reply)  # failures arrive in-band on a stream: parse every response (~µs)
        if message.HasField("error"):
            raise RequestFailed(f"stream error: {message.error.reason}: {message.error.message}")
        if not message.results[0].predictions:
            raise RequestFailed("no predictions in the gRPC stream response")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.done_writing()
        await self.channel.close()


class GrpcDriver:
    """`grpc-unary` (Classify) or `grpc-stream` (ClassifyStream), with the generated message classes."""

    def __init__(self, host: str, port: int, payloads: Sequence[Payload], streaming: bool) -> None:
        from service.grpc.gen.levit.v1 import classifier_pb2 as pb

        self.pb = pb
        self.target = f"{host}:{port}"
        self.streaming = streaming
        self.name = "grpc-stream" if streaming else "grpc-unary"
        service = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
        self.method = f"/{service}/{'ClassifyStream' if streaming else 'Classify'}"
        self.requests = [
            pb.ClassifyRequest(
                images=[pb.Image(data=p.data, filename=p.filename)], request_id=str(i)
            ).SerializeToString()
            for i, p in enumerate(payloads)
        ]

    async def connect(self) -> Client:
        from grpc import aio

        channel = aio.insecure_channel(self.target, options=_GRPC_OPTIONS)
        await channel.channel_ready()
        parse = self.pb.ClassifyResponse.FromString
        if self.streaming:
            stream = channel.stream_stream(self.method)()  # no (de)serializers: bytes in, bytes out
            return GrpcStreamClient(channel, stream, self.requests, parse)
        return GrpcUnaryClient(channel, channel.unary_unary(self.method), self.requests, parse)


DRIVERS: dict[str, Callable[[str, int, Sequence[Payload]], Driver]] = {
    "http": http_driver,
    "grpc-unary": lambda host, port, payloads: GrpcDriver(host, port, payloads, streaming=False),
    "grpc-stream": lambda host, port, payloads: GrpcDriver(host, port, payloads, streaming=True),
}


# --- running a level -------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    protocol: str
    payloads: str
    concurrency: int
    seconds: float  # measured window
    latencies: list[float] = field(default_factory=list)  # seconds, requests completed inside the window
    errors: int = 0
    first_error: str = ""
    client_cpu: float = 0.0  # load generator CPU seconds / window seconds (1.0 = one core)

    @property
    def images_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0] * 1000
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q) - 1] * 1000


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(
    driver: Driver, count: int, concurrency: int, warmup: float, duration: float, label: str = ""
) -> LevelResult:
    """`concurrency` clients cycle through `count` payloads for warmup + duration seconds.

    Every request that *completes* inside the window counts, whenever it started: the window's throughput is
    those requests divided by its length (every request carries one image), and their latencies give the
    percentiles. Counting only requests that also started inside the window, as this did until 2026-12-06,
    leaves out those in flight at either end: a closed loop then reports throughput x (1 - latency / window),
    3% low for 150 ms answers in a 5 s window and 12% low for 600 ms ones (docs/benchmarks.md).
    """
    clients = [await driver.connect() for _ in range(concurrency)]
    result = LevelResult(driver.name, label, concurrency, duration)
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + duration
    cpu_at_window: list[float] = []

    async def loop(client: Client, offset: int) -> None:
        i = offset
        while (now := time.perf_counter()) < window_end:
            if now >= window_start and not cpu_at_window:
                cpu_at_window.append(_cpu_seconds())
            try:
                await client.call(i % count)
            except Exception as error:
                result.errors += 1
                result.first_error = result.first_error or f"{type(error).__name__}: {error}"[:300]
                if isinstance(error, OSError | asyncio.IncompleteReadError):
                    return
            else:
                done = time.perf_counter()
                if window_start <= done <= window_end:
                    result.latencies.append(done - now)
            i += 1

    try:
        await asyncio.gather(*(loop(c, k) for k, c in enumerate(clients)))
    finally:
        cpu_end = _cpu_seconds()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    if cpu_at_window:
        result.client_cpu = (cpu_end - cpu_at_window[0]) / (time.perf_counter() - window_start)
    return result
