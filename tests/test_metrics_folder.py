"""The metrics folder's lock (service/metrics_folder.py): a folder is swept only when no process of its server
is alive. Real processes, real `flock`s, in a temp dir of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service import metrics_folder
from tests.conftest import ROOT

HOLDER = """
import os, sys, time
from service import metrics_folder
if sys.argv[1] == "supervisor":
    print(metrics_folder.prepare(), flush=True)
else:
    metrics_folder.hold()
    print("holding", flush=True)
time.sleep(600)
"""


def _start(role: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, role], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_a_folder_is_swept_only_once_every_process_holding_it_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor, then a front-end still draining after its supervisor was killed, each keep the folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != metrics_folder.METRICS_ENV} | {"TMPDIR": str(tmp_path)}
    supervisor, folder = _start("supervisor", env)
    front_end, said = _start("front-end", env | {metrics_folder.METRICS_ENV: folder})
    try:
        assert Path(folder).parent == tmp_path and said == "holding"
        assert metrics_folder.remove_orphaned() == [] and Path(folder).is_dir()  # both alive
        supervisor.kill()
        supervisor.wait()
        assert metrics_folder.remove_orphaned() == [] and Path(folder).is_dir()  # the front-end still holds it
        front_end.kill()
        front_end.wait()
        assert metrics_folder.remove_orphaned() == [folder] and not Path(folder).exists()
    finally:
        for proc in (supervisor, front_end):
            proc.kill()
            proc.wait()


def test_folders_without_a_lock_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older versions made no lock: whether their server lives cannot be told, so they are kept."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = tmp_path / (metrics_folder.PREFIX + "old")
    old.mkdir()
    (old / "counter_1.db").write_bytes(b"\0" * 64)
    assert metrics_folder.remove_orphaned() == [] and old.is_dir()
