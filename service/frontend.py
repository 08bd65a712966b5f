"""A front-end process: HTTP + gRPC + decoding, handing crops to the model processes through the ring."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

from service.batching.ring import Pipes, RingSpec
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontendSpec:
    """What a spawned front-end needs: picklable (the socket and pipes travel as file descriptors)."""

    index: int
    settings: Settings
    ring: RingSpec
    pipes: Pipes
    http_socket: socket.socket
    grpc_port: int
    decoders: int
    cores: tuple[int, ...] | None = None  # pinned to these (LEVIT_PIN_CORES), before any thread exists


def main(spec: FrontendSpec) -> None:
    """Entry point of a spawned front-end; exits with `Server.run`'s status."""
    from service import logs, metrics_folder
    from service.batching.launch import die_with_parent
    from service.threads import name_os_thread

    die_with_parent(signal.SIGTERM)  # the supervisor is gone: drain and exit
    metrics_folder.hold()  # ... and keep the samples' folder from a new supervisor's sweep meanwhile
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which orders the stop
    settings = spec.settings.model_copy(update={"grpc_port": spec.grpc_port})
    logs.configure(settings.log_level, settings.log_format)
    name_os_thread(f"levit-front-{spec.index}")

    from service.batching.remote import RemoteModel
    from service.server import Server

    async def serve() -> int:
        model = RemoteModel(spec.ring, spec.pipes, spec.index, settings.max_queue)
        server = Server(
            settings, model=model, http_socket=spec.http_socket, grpc_shared_port=True, decoders=spec.decoders
        )
        return await server.run()

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] ships uvloop
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        sys.exit(runner.run(serve()))
