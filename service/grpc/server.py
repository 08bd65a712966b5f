"""The grpc.aio server: Classifier, standard health checking and reflection, in the HTTP server's event loop.

Started together with HTTP (before the model has loaded), so health answers NOT_SERVING while loading;
stopped after the service has drained, with a short grace period for responses still being written.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.core import Phase, Service
from service.grpc import inference as v2
from service.grpc.gen.levit.v1 import classifier_pb2_grpc as pb_grpc
from service.grpc.servicer import SERVICE_NAME, STREAM_METHOD, ClassifierServicer
from service.grpc.status import Observed

# "", "levit.v1.Classifier" and "inference.GRPCInferenceService"
HEALTH_NAMES = (health.OVERALL_HEALTH, SERVICE_NAME, v2.SERVICE_NAME)


class MetricsInterceptor(aio.ServerInterceptor):
    """Latency histogram, status and in-flight gauge for every RPC, like the HTTP middleware; `protocol` is
    "v2-grpc" for inference.GRPCInferenceService, "grpc" for the rest.

    The bidirectional streams (ClassifyStream, ModelStreamInfer) are observed per request on the stream by their
    handlers instead (one observation per classification, whichever the protocol or RPC), so a long-lived stream
    is not one hours-long "request".
    """

    def __init__(self, per_message: frozenset[str] = frozenset({STREAM_METHOD, v2.STREAM_METHOD})) -> None:
        self.per_message = per_message

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method in self.per_message:
            return handler
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        protocol = v2.PROTOCOL if details.method in v2.METHODS else "grpc"
        return handler._replace(**{kind: _observed(getattr(handler, kind), details.method, protocol)})


def _observed(behavior: Callable[..., Any], method: str, protocol: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: aio.ServicerContext) -> Any:
            with Observed(method, context, protocol):
                async for response in behavior(request, context):
                    yield response

        return stream
    if not inspect.iscoroutinefunction(behavior):
        return behavior  # a synchronous handler (Triton's RPCs this server does not implement): left alone

    async def call(request: Any, context: aio.ServicerContext) -> Any:
        with Observed(method, context, protocol):
            return await behavior(request, context)

    return call


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """`start()` binds host:grpc_port (0 picks a free port, then `port` tells it); `stop()` after the drain."""

    def __init__(self, service: Service, stream_window: int | None = None, shared_port: bool = False) -> None:
        self.service = service
        self._shared_port = shared_port  # front-end processes of one server share the port (SO_REUSEPORT)
        self.settings = service.settings
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self._draining = asyncio.Event()
        self._stream_window = stream_window
        self._server: aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        limit = self.settings.max_upload_bytes  # the HTTP body limit: the same images fit either protocol
        server = aio.server(
            interceptors=[MetricsInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                # A stranger on the same port must fail, as HTTP does; our own front-ends share it.
                ("grpc.so_reuseport", int(self._shared_port)),
            ],
        )
        servicer = ClassifierServicer(self.service, self._draining, self._stream_window)
        pb_grpc.add_ClassifierServicer_to_server(servicer, server)
        v2_servicer = v2.InferenceServicer(self.service, self._draining, self._stream_window)
        v2.pb_grpc.add_GRPCInferenceServiceServicer_to_server(v2_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        names = (SERVICE_NAME, v2.SERVICE_NAME, health_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        await self._publish()  # NOT_SERVING before the first connection is accepted
        self.port = server.add_insecure_port(address(self.settings.host, self.settings.grpc_port))
        await server.start()
        self._server = server
        self.service.on_phase_change(self._on_phase)
        return self.port

    def _on_phase(self, phase: Phase) -> None:
        if phase in (Phase.DRAINING, Phase.FAILED):
            self._draining.set()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._schedule_publish()
        else:
            loop.call_soon_threadsafe(self._schedule_publish)

    def _schedule_publish(self) -> None:
        task = asyncio.ensure_future(self._publish())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _publish(self) -> None:
        """Health follows the phase at the time this runs, so updates applied out of order still end right."""
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if self.service.phase is Phase.READY else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_NAMES:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs; give those in progress `grace` seconds, then cancel them (health watchers, say)."""
        self._draining.set()
        if self._health_updates:
            await asyncio.wait(set(self._health_updates))
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
