"""A real server process for stress tests: resource readings come from its own /proc and /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import httpx

from tests.conftest import ROOT, wait_until
from tests.test_lifecycle import free_port


class ServerProcess:
    """`python -m service` on free ports, random weights, eager engine; ready when made unless `wait=False`."""

    def __init__(self, wait: bool = True, **env: str) -> None:
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
        if wait:
            wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout=180)

    def pids(self) -> list[int]:
        """The supervisor and every live process under it (front-ends, model instances)."""
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        tree, frontier = [self.proc.pid], [self.proc.pid]
        while frontier:
            frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
            tree += frontier
        return tree

    def _sum(self, read: Callable[[int], int]) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):  # a process may exit between listing and reading
                total += read(pid)
        return total

    def rss_mib(self) -> float:
        """Resident memory of all the server's processes together (shared pages counted in each)."""
        page = os.sysconf("SC_PAGE_SIZE")

        def rss(pid: int) -> int:
            with open(f"/proc/{pid}/statm") as statm:
                return int(statm.read().split()[1]) * page

        return self._sum(rss) / 2**20

    def fds(self) -> int:
        return self._sum(lambda pid: len(os.listdir(f"/proc/{pid}/fd")))

    def threads(self) -> int:
        return self._sum(lambda pid: len(os.listdir(f"/proc/{pid}/task")))

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
