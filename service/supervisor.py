"""The parent process: binds the ports, lays out the ring, runs front-end and model processes, restarts them.

    supervisor ──┬── front-end 0..W-1 (HTTP + gRPC + decode) ──┐  crops in shared memory,
                 │                                             ├─ 32-byte records through pipes
                 └── model instance 0..I-1 (T threads each) ───┘  (service.batching.ring)

Outside it is one service: one HTTP port (one listening socket that every front-end accepts from), one
gRPC port (SO_REUSEPORT), one `/metrics` (prometheus-client's multiprocess mode: any front-end reports
the totals of all processes), one readiness (ready while a model instance is), one queue bound, one drain.

Supervision: a process that dies is seen at once (its sentinel becomes readable). Front-ends fail the
images a dead model process had taken (they watch the instance epochs in the ring) and readiness drops if
no other instance can serve; the process is started again under the same index. An instance that exits
before it was ever ready is a start-up failure (bad weights, say): the server stops with status 1.
SIGTERM: front-ends drain (readiness off, admitted work finishes), then model processes stop; exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from service import metrics_folder
from service.metrics_folder import METRICS_ENV
from service.settings import Settings
from service.threads import openmp_environment

log = logging.getLogger(__name__)
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # by restarts of the same process in the last minute
STOP_GRACE_S = 10.0  # after the drain timeout, before a front-end is killed


@dataclass
class _Child:
    role: str  # "front-end" or "model"
    index: int
    process: BaseProcess | None = None
    ready_once: bool = False
    restarts: list[float] = field(default_factory=list)
    due: float = 0.0  # when a dead child may be started again


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        from service.batching.ring import Ring, RingSpec, make_pipes, segment_bytes
        from service.sockets import bind, reserve_shared_port
        from service.topology import plan, resolved

        self.topology = plan(settings)
        self.settings = resolved(settings, self.topology)
        s = self.settings
        t = self.topology
        self._ctx = mp.get_context("spawn")
        self.http_socket = bind(s.host, s.http_port)
        self.http_port: int = self.http_socket.getsockname()[1]
        self._grpc_holder, self.grpc_port = reserve_shared_port(s.host, s.grpc_port)
        u8 = s.max_queue + t.instances * s.max_batch_size + s.max_images_per_request
        f32 = min(s.max_images_per_request, 64)
        self.ring_spec = RingSpec(u8, f32, t.workers, t.instances)
        self.pipes = make_pipes(t.workers, t.instances)
        self.ring = Ring.create(self.ring_spec, self.pipes)
        self.ring_bytes = segment_bytes(self.ring_spec)
        self.instance_cores, self.frontend_cores = t.core_sets(s.pin_cores)
        self.frontends = [_Child("front-end", i) for i in range(t.workers)]
        self.instances = [_Child("model", i) for i in range(t.instances)]
        self._stopping = False  # a plain flag: set from the signal handler (see request_stop)
        self._status = 0

    # --- processes ---------------------------------------------------------------------------------------

    def _spawn(self, child: _Child) -> None:
        from service import frontend as frontend_module
        from service.batching.launch import InstanceSpec, run_instance

        if child.role == "model":
            if self.topology.device == "cpu":  # read once by OpenMP when torch loads in the child; a user's own wins
                for name, value in openmp_environment(self.settings.thread_policy, self.settings.spin_count).items():
                    os.environ.setdefault(name, value)
            spec = InstanceSpec(
                child.index,
                int(self.ring.instance_epoch[child.index]),
                self.settings,
                self.ring_spec,
                self.pipes,
                self.instance_cores[child.index],
            )
            target, name = run_instance, f"levit-model-{child.index}"
        else:
            decoders = max(2, self.topology.cores // self.topology.workers)
            spec = frontend_module.FrontendSpec(
                child.index,
                self.settings,
                self.ring_spec,
                self.pipes,
                self.http_socket,
                self.grpc_port,
                decoders,
                self.frontend_cores,
            )
            target, name = frontend_module.main, f"levit-front-{child.index}"
        child.process = self._ctx.Process(target=target, args=(spec,), name=name, daemon=False)
        child.process.start()

    def _reap(self, child: _Child) -> None:
        """A child exited: account for it, and decide whether and when it comes back."""
        from prometheus_client import multiprocess

        from service.batching.ring import DOWN

        process = child.process
        assert process is not None
        code = process.exitcode
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(process.pid)
        child.process = None
        if child.role == "model":
            self.ring.instance_state[child.index] = DOWN
            self.ring.instance_epoch[child.index] += 1  # front-ends fail what it had taken
            if not child.ready_once:
                if not self._stopping:  # the first failure speaks for all: one line
                    reason = self.ring.instance_error(child.index) or f"model process exited with status {code}"
                    log.error("cannot start: %s", reason)
                    self._status = 1
                    self._stopping = True
                return
        if self._stopping:
            return
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < 60] + [now]
        child.due = now + RESTART_BACKOFF_S[min(len(child.restarts) - 1, len(RESTART_BACKOFF_S) - 1)]
        log.error("%s %d (pid %d) exited with status %s: restarting", child.role, child.index, process.pid, code)

    def _children(self) -> list[_Child]:
        return [*self.instances, *self.frontends]

    # --- main loop ---------------------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """The SIGTERM/SIGINT handler: sets a flag the main loop reads at least every 50 ms, and nothing else.

        Why not a `threading.Event`: Python runs a signal handler in the main thread between two bytecodes,
        also between those of an earlier run of the same handler. `Event.set` takes a lock, so a second signal
        arriving while the first handler held it blocked forever on that lock (found with two SIGTERMs a
        microsecond apart: `timeout` forwarding one while `pkill` sent the other); the supervisor never stopped.
        """
        self._stopping = True

    def run(self) -> int:
        from service.batching.ring import READY

        t = self.topology
        log.info(
            "supervisor: %d front-end(s), %d model instance(s) x %d threads%s on %d cores (%s); ring %.0f MiB",
            t.workers, t.instances, t.threads, " (a pair splitting batches, sharing the threads)" if t.split else "",
            t.cores, t.device, self.ring_bytes / 2**20,
        )  # fmt: skip
        if self.frontend_cores is not None:
            log.info("pinned: model instances on cores %s, front-ends on %s", self.instance_cores, self.frontend_cores)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        for child in self._children():
            self._spawn(child)
        ready_logged = False
        while not self._stopping:
            sentinels = {c.process.sentinel: c for c in self._children() if c.process is not None}
            for sentinel in wait(list(sentinels), timeout=0.05):
                child = sentinels[sentinel]  # type: ignore[index]
                if child.process is not None:
                    child.process.join()
                    self._reap(child)
            for instance in self.instances:
                if instance.process is not None and self.ring.instance_state[instance.index] == READY:
                    instance.ready_once = True
            if not ready_logged and self.ring.any_instance_ready():
                log.info("serving HTTP on %s:%d, gRPC on %s:%d", self.settings.host, self.http_port,
                         self.settings.host, self.grpc_port)  # fmt: skip
                ready_logged = True
            now = time.monotonic()
            for child in self._children():
                if child.process is None and not self._stopping and now >= child.due:
                    self._spawn(child)
        status = self._shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):  # stopped: a late signal is moot, and Python restores the
            signal.signal(sig, signal.SIG_IGN)  # default action at exit, which would turn exit 0 into death by it
        return status

    def _shutdown(self) -> int:
        """Front-ends first (they drain), then the model processes they were waiting on."""
        log.info("stop requested: draining (up to %.1fs)", self.settings.drain_timeout_s)
        deadline = time.monotonic() + self.settings.drain_timeout_s + STOP_GRACE_S
        for child in self.frontends:
            if child.process is not None:
                child.process.terminate()  # SIGTERM: the front-end's own ordered drain
        for child in self.frontends:
            if child.process is None:
                continue
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.exitcode is None:
                log.error("front-end %d did not stop in time: killing it", child.index)
                child.process.kill()
                child.process.join()
                self._status = self._status or 3
            elif child.process.exitcode == -signal.SIGTERM:  # still starting: its drain handler was not set yet
                log.info("front-end %d was stopped before it served: nothing to drain", child.index)
            elif child.process.exitcode != 0:
                self._status = self._status or child.process.exitcode
        for child in self.instances:
            if child.process is not None:
                child.process.terminate()
        for child in self.instances:
            if child.process is not None:
                child.process.join(STOP_GRACE_S)
                if child.process.exitcode is None:
                    child.process.kill()
                    child.process.join()
        self.close()
        log.info("stopped")
        return self._status

    def close(self) -> None:
        self.ring.close()
        self.http_socket.close()
        self._grpc_holder.close()


def serve(settings: Settings) -> int:
    """`python -m service` with LEVIT_INSTANCE_KIND=process."""
    owned = METRICS_ENV not in os.environ
    directory = metrics_folder.prepare()
    try:
        try:
            supervisor = Supervisor(settings)
        except (OSError, ValueError) as error:
            log.error("cannot start: %s", error)
            return 1
        return supervisor.run()
    finally:
        if owned:
            shutil.rmtree(directory, ignore_errors=True)
