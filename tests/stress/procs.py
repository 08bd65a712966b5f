"""A real server process for stress tests: resource readings come from its own /proc and /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import httpx

from tests.conftest import ROOT, wait_until
from tests.helpers import metric, scrape
from tests.test_lifecycle import free_port


class ServerProcess:
    def __init__(self, **env: str) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        full = {
            **os.environ,
            "LEVIT_HOST": "127.0.0.1",
            "LEVIT_WEIGHTS": "random",
            "LEVIT_ENGINE": "eager",
            "LEVIT_LOG_LEVEL": "WARNING",
            "LEVIT_HTTP_PORT": str(self.http_port),
            "LEVIT_GRPC_PORT": str(self.grpc_port),
            **env,
        }
        # The server's stderr, for post-mortems: a file, never a pipe that can fill up and stall the server.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=self.log
        )
        self.url = f"http://127.0.0.1:{self.http_port}"
        wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout=180)

    def rss_mib(self) -> float:
        return metric(scrape(self.url), "process_resident_memory_bytes") / 2**20

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.kill()


@contextlib.contextmanager
def running(**env: str) -> Iterator[ServerProcess]:
    """A server for the block. If the block fails, its failure is the one reported (the server is still
    stopped); if it passed, SIGTERM must then end the process with status 0."""
    server = ServerProcess(**env)
    try:
        yield server
    except BaseException:
        with contextlib.suppress(Exception):
            server.stop()
        raise
    status = server.stop()
    assert status == 0, f"server exited {status} after SIGTERM; its log:\n{server.logs()[-4000:]}"
