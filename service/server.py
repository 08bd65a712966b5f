"""One front-end: one event loop serving HTTP (uvicorn) and gRPC (grpc.aio) over `Service`, with an ordered shutdown.

The same class is the whole server with `LEVIT_INSTANCE_KIND=thread` (the model in a thread of this process),
and each front-end process under `service.supervisor` otherwise (the model in model processes).

SIGTERM: readiness (HTTP /readyz and gRPC health) fails at once, new work is refused, admitted work finishes
(bounded by `drain_timeout_s`), then the listeners close. Exit status: 0 after a drain that finished every
admitted request, 3 when the drain timed out with work still in flight, 1 when the model never loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from model.weights import WeightsError
from service.core import ModelBackend, Phase, Service
from service.grpc.server import GrpcServer
from service.rest.app import create_app
from service.settings import Settings
from service.sockets import bind

if TYPE_CHECKING:  # the model thread's hook; front-end processes never import torch
    from service.batching.batcher import Hook

log = logging.getLogger(__name__)
# model.checkpoint's CheckpointError is a ValueError (importing it would import torch into front-ends).
STARTUP_ERRORS = (WeightsError, RuntimeError, OSError, ValueError)
GRPC_GRACE_S = 1.0  # after the drain only health watchers and responses being written are left
EXIT_DRAIN_TIMEOUT = 3  # stopped, but admitted work was cut off by LEVIT_DRAIN_TIMEOUT_S


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Server below orders the shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    def __init__(
        self,
        settings: Settings,
        before_forward: Hook | None = None,
        *,
        model: ModelBackend | None = None,
        http_socket: socket.socket | None = None,
        grpc_shared_port: bool = False,
        decoders: int | None = None,
    ) -> None:
        """`model` defaults to the in-process model thread; a supervisor passes the listening HTTP socket
        (shared by every front-end) and `grpc_shared_port` (SO_REUSEPORT on the port it reserved)."""
        if model is None:
            from service.batching.local import LocalModel

            model = LocalModel(settings, before_forward)
        self.settings = settings
        self.service = Service(settings, model, decoders)
        self._stop = asyncio.Event()
        self.http_socket = http_socket or bind(settings.host, settings.http_port)
        self.http_socket.setblocking(False)
        self.http_port: int = self.http_socket.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.service),
            log_config=None,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=max(1.0, settings.drain_timeout_s),
            timeout_keep_alive=30,
        )
        self.http = _Uvicorn(config)
        self.grpc = GrpcServer(self.service, shared_port=grpc_shared_port)

    @property
    def grpc_port(self) -> int | None:
        """The bound gRPC port (useful with grpc_port=0), once `run()` has started listening."""
        return self.grpc.port

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, handle_signals: bool = True) -> int:
        """Serve until stopped; the exit status is in the module's docstring."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.grpc.start()
        except STARTUP_ERRORS as error:
            log.error("cannot start gRPC on %s:%d: %s", self.settings.host, self.settings.grpc_port, error)
            self.http_socket.close()
            await self.service.close()
            return 1
        http = loop.create_task(self.http.serve(sockets=[self.http_socket]))
        starting = loop.create_task(self.service.start())
        stop = loop.create_task(self._stop.wait())
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        if starting.done() and starting.exception() is not None:
            error = starting.exception()
            log.error("cannot start: %s", error if isinstance(error, STARTUP_ERRORS) else repr(error))
            self.service.phase = Phase.FAILED
            status = 1
        else:
            host = self.settings.host
            log.info("serving HTTP on %s:%d, gRPC on %s:%d", host, self.http_port, host, self.grpc_port)
            await stop
            log.info("stop requested: draining (up to %.1fs)", self.settings.drain_timeout_s)
            starting.cancel()
            if not await self.service.drain(self.settings.drain_timeout_s):
                status = EXIT_DRAIN_TIMEOUT
        self.http.should_exit = True
        await asyncio.gather(http, self.grpc.stop(GRPC_GRACE_S))
        await self.service.close()
        log.info("stopped")
        return status
