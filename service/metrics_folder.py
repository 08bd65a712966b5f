"""The folder where every process of one server writes its Prometheus samples (prometheus-client's
multiprocess mode), and the sweep of the folders that killed servers left behind.

Its own module: the supervisor must set `PROMETHEUS_MULTIPROC_DIR` before anything imports prometheus_client
(`service.metrics` does), and its children must hold the folder's lock as long as they live.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "levit-metrics-"
LOCK = ".lock"  # flock(LOCK_SH) by the supervisor and each of its processes, for as long as each lives

_held: list[int] = []  # this process's lock descriptor, kept open (and locked) until it exits


def prepare() -> str:
    """The folder for this server's samples: `PROMETHEUS_MULTIPROC_DIR` when set (emptied of old samples), else
    a new one in the temp dir, locked, after removing the folders of servers that were killed.

    Must run before any process imports prometheus_client, so the supervisor calls it first thing.
    """
    directory = os.environ.get(METRICS_ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)
        for entry in os.listdir(directory):  # samples of an earlier run would be added to ours
            if entry.endswith(".db"):
                os.unlink(os.path.join(directory, entry))
        return directory
    remove_orphaned()
    directory = tempfile.mkdtemp(prefix=PREFIX)
    staging = os.path.join(directory, LOCK + ".new")  # locked under another name, then renamed: a sweep
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)  # never finds the lock unlocked
    if _lock(fd, fcntl.LOCK_SH):
        _held.append(fd)
        os.rename(staging, os.path.join(directory, LOCK))
    else:
        os.close(fd)  # no locks on this filesystem: the folder is never swept (nor removed while in use)
    os.environ[METRICS_ENV] = directory
    return directory


def hold() -> None:
    """A process of the server takes its share of the folder's lock (no-op without one): a front-end still
    draining after its supervisor was killed keeps the folder from the next supervisor's sweep."""
    directory = os.environ.get(METRICS_ENV)
    if not directory:
        return
    try:
        fd = os.open(os.path.join(directory, LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    if _lock(fd, fcntl.LOCK_SH):
        _held.append(fd)
    else:
        os.close(fd)


def _lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as error:  # held by another (EWOULDBLOCK), or no locks here (ENOLCK, some FUSE and NFS)
        if kind == fcntl.LOCK_SH:
            log.warning("metrics folder lock not taken (%s): a killed server's folder will not be swept", error)
        return False


def remove_orphaned() -> list[str]:
    """Delete the metrics folders of servers that died without cleaning up (`kill -9`, the OOM killer).

    Why: a pod's `/tmp` (an emptyDir of 64 MiB) outlives container restarts, and each dead run left its samples
    there. A folder is an orphan when no process holds its lock: the kernel releases a `flock` when its holder
    dies, however it dies, and in whatever PID namespace it ran. Folders without a lock (older versions, or
    filesystems without locks) are left alone. The temp dir must be local to the host: locks on a network
    filesystem may be local to each client. Returns the folders removed.
    """
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        try:
            fd = os.open(os.path.join(path, LOCK), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not _lock(fd, fcntl.LOCK_EX):
                continue  # a live server's
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d metrics folder(s) left by servers that were killed", len(removed))
    return removed
