"""The bidirectional-stream loop both gRPC APIs share (levit.v1 ClassifyStream, v2 ModelStreamInfer).

A stream reads while fewer than `window` of its requests are in progress and answers each as soon as it
is done, in completion order; each answer carries its request's id. Draining stops the reading (what was
accepted still finishes, then the stream ends UNAVAILABLE); a cancelled stream cancels its queued work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from grpc import aio

from service.errors import OUTCOMES, Refusal
from service.grpc.status import Observed, abort, settle, status_of

log = logging.getLogger(__name__)
SHUTTING_DOWN = "server is shutting down; retry on another replica"
Request = TypeVar("Request")
Response = TypeVar("Response")
Write = Callable[[Response], Awaitable[None]]
Failed = Callable[[grpc.StatusCode, str, str], Response]  # (status, message, machine code) -> error response


def stream_window(max_batch_size: int) -> int:
    """Requests one stream may have in progress: enough to fill two batches (one computing, one forming).
    Raw request bytes held per stream stay below window x the message limit."""
    return max(4, 2 * max_batch_size)


async def serve_stream(
    requests: AsyncIterator[Request],
    context: aio.ServicerContext,
    draining: asyncio.Event,
    window_size: int,
    answer: Callable[[Request, aio.ServicerContext, Write], Awaitable[None]],
) -> None:
    """`answer(request, context, write)` computes one response and sends it through `write` (serialised, and a
    no-op once the stream has ended); the request leaves the window only after its response is written,
    so responses the client is slow to read still count."""
    window = asyncio.Semaphore(window_size)
    write_lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def write(response: Response) -> None:
        async with write_lock:
            try:
                await context.write(response)
            except aio.BaseError as error:  # the stream ended (cancelled, or aborted) meanwhile
                log.debug("stream response not sent: %r", error)

    async def one(request: Request) -> None:
        try:
            await answer(request, context, write)
        finally:
            window.release()

    stopping = asyncio.ensure_future(draining.wait())
    incoming_requests = aiter(requests)
    shutting_down = False
    try:
        while True:
            await window.acquire()
            incoming = asyncio.ensure_future(anext(incoming_requests))
            await asyncio.wait({incoming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not incoming.done():  # draining: stop reading, finish what was accepted
                incoming.cancel()
                shutting_down = True
                break
            try:
                request = incoming.result()
            except StopAsyncIteration:
                break
            task = asyncio.ensure_future(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
    finally:
        stopping.cancel()
        for task in tasks:  # the stream was cancelled (client gone, deadline): so is its queued work
            task.cancel()
    if shutting_down:
        await abort(context, OUTCOMES["draining"], SHUTTING_DOWN)


async def respond(
    observed: Observed,
    context: aio.ServicerContext,
    compute: Callable[[], Awaitable[Response]],
    failed: Failed,
    write: Write,
) -> None:
    """One request of a stream: its response, or an error response for it alone (the stream goes on)."""
    response = await settle(context, compute)
    if isinstance(response, Refusal):
        observed.status = status_of(response.outcome)
        response = failed(observed.status, response.message, response.outcome.code)
    await write(response)
