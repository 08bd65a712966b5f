"""The real process: `python -m service` with env settings, SIGTERM drain, start-up refusals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, photo, wait_until
from tests.helpers import metric, scrape


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    full = {**os.environ, "LEVIT_HOST": "127.0.0.1", "LEVIT_WEIGHTS": "random", "LEVIT_ENGINE": "eager", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args], cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_sigterm_under_load_loses_nothing() -> None:
    port = free_port()
    proc = start(
        {"LEVIT_HTTP_PORT": str(port), "LEVIT_GRPC_PORT": "0", "LEVIT_MODEL": "LeViT_384", "LEVIT_MAX_BATCH_SIZE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=120)
        cat = photo("cat.jpg")
        with ThreadPoolExecutor(16) as pool:
            futures = [
                pool.submit(httpx.post, url + "/classify", files={"img": ("cat.jpg", cat)}, timeout=60)
                for _ in range(16)
            ]
            wait_until(lambda: metric(scrape(url), "levit_queue_depth") >= 4)
            proc.send_signal(signal.SIGTERM)
            statuses = [f.result().status_code for f in futures]
        assert statuses == [200] * 16
        assert proc.wait(timeout=60) == 0
        assert b"draining" in proc.stderr.read()
    finally:
        proc.kill()


def test_invalid_setting_is_named_and_refused() -> None:
    proc = start({"LEVIT_MAX_BATCH_SIZE": "0"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert b"LEVIT_MAX_BATCH_SIZE" in err and b"Traceback" not in err


def test_unknown_flag_value_is_named() -> None:
    proc = start({}, "--model", "LeViT_999")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and b"LEVIT_MODEL" in err and b"LeViT_999" in err


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d.joinpath("junk.pth").write_bytes(b"not a checkpoint") and d / "junk.pth", b"not a readable"),
        (lambda d: d / "missing.pth", b"does not exist"),
    ],
)
def test_bad_weights_refuse_to_start_with_one_line(tmp_path: Path, make, needle) -> None:
    path = make(tmp_path)
    proc = start({"LEVIT_WEIGHTS": str(path), "LEVIT_HTTP_PORT": "0", "LEVIT_GRPC_PORT": "0"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert needle in err and b"Traceback" not in err
    assert b"cannot start" in err
