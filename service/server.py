"""One process, one event loop: HTTP (uvicorn), gRPC (grpc.aio) and the shared batcher, with an ordered shutdown.

SIGTERM: readiness (HTTP /readyz and gRPC health) fails at once, new work is refused, admitted work finishes
(bounded by `drain_timeout_s`), then the listeners close and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from model.checkpoint import CheckpointError
from model.weights import WeightsError
from service.batching.batcher import Hook
from service.core import Phase, Service
from service.grpc.server import GrpcServer
from service.rest.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)
STARTUP_ERRORS = (WeightsError, CheckpointError, RuntimeError, OSError, ValueError)
GRPC_GRACE_S = 1.0  # after the drain only health watchers and responses being written are left


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Server below orders the shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Server:
    def __init__(self, settings: Settings, before_forward: Hook | None = None) -> None:
        self.settings = settings
        self.service = Service(settings, before_forward)
        self._stop = asyncio.Event()
        self.http_socket = bind(settings.host, settings.http_port)
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
        self.grpc = GrpcServer(self.service)

    @property
    def grpc_port(self) -> int | None:
        """The bound gRPC port (useful with grpc_port=0), once `run()` has started listening."""
        return self.grpc.port

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, handle_signals: bool = True) -> int:
        """Serve until stopped; the exit status is 0 after a clean drain, 1 if the model never loaded."""
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
            await self.service.drain(self.settings.drain_timeout_s)
        self.http.should_exit = True
        await asyncio.gather(http, self.grpc.stop(GRPC_GRACE_S))
        await self.service.close()
        log.info("stopped")
        return status
