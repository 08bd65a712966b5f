"""One running peer: started in its own process group, waited on until ready, measured, killed whole.

A peer may be a tree of processes (TorchServe: a launcher, a JVM and Python workers; LitServe and
MLServer: worker processes), so both the CPU it uses and the clean-up work on the whole tree: the
CPU is read from /proc for the root and all its live descendants, and stopping kills the process
group (every process a peer starts stays in it) and then anything of the tree still left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.peers.peers import Launch, Peer
from bench.procs import die_with_parent, free_port, process_tree, tree_cpu_seconds


class PeerFailed(Exception):
    """A peer that exited or never became ready; the message ends with its log's tail."""


class PeerProcess:
    def __init__(self, peer: Peer, checkpoint: Path) -> None:
        self.peer = peer
        workdir = Path(tempfile.mkdtemp(prefix=f"levit-peer-{peer.name}-"))
        self.launch = Launch({name: free_port() for name in peer.port_names}, workdir, checkpoint)
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The port requests go to."""
        return self.launch.ports[self.peer.port_names[0]]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        command = self.peer.command(self.launch)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.peer.env(self.launch)}
        env.pop("VIRTUAL_ENV", None)  # the peer runs its own venv's interpreter by path
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.launch.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed whole by stop()
                preexec_fn=die_with_parent,
            )

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self) -> float:
        """Seconds until the peer's readiness check passed; PeerFailed if it exits or times out."""
        assert self.proc is not None
        start = time.monotonic()
        while time.monotonic() - start < self.peer.ready_timeout_s:
            if self.proc.poll() is not None:
                raise PeerFailed(f"{self.peer.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if self.peer.ready(self.launch):
                return time.monotonic() - start
            time.sleep(0.5)
        raise PeerFailed(f"{self.peer.name} not ready after {self.peer.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def tree(self) -> list[int]:
        return process_tree(self.pid)

    def stop(self, keep_workdir: bool = False) -> None:
        """Graceful stop where the peer has one, then SIGTERM/SIGKILL to its group and any stray descendant."""
        if self.proc is None:
            return
        tree = set(self.tree()) if self.proc.poll() is None else set()
        if self.peer.stop is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.peer.stop(self.launch)
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            for pid in tree:  # a descendant that left the group (none should) goes too
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and (self.proc.poll() is None or _group_alive(self.proc.pid)):
                time.sleep(0.1)
            if self.proc.poll() is not None and not _group_alive(self.proc.pid):
                break
        self.proc.wait()
        if not keep_workdir:
            shutil.rmtree(self.launch.workdir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies waiting for a reaper do not count)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    return True
    return False
