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
import torch

from tests.conftest import ROOT, photo, wait_until
from tests.helpers import metric, random_levit, scrape


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
        {
            "LEVIT_HTTP_PORT": str(port),
            "LEVIT_GRPC_PORT": "0",
            "LEVIT_MODEL": "LeViT_384",
            "LEVIT_MAX_BATCH_SIZE": "1",
            # the drain is under test, not deadlines: 16 serial LeViT_384 forwards passed the default 10 s on a busy
            # 2-core host (one 504), so every admitted request gets time to finish
            "LEVIT_REQUEST_TIMEOUT_MS": "120000",
        }
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
            # Every request admitted (queued, running or answered) and work still waiting: now stop.
            wait_until(
                lambda: (
                    (depth := metric(scrape(url), "levit_queue_depth")) >= 2
                    and depth + 1 + sum(f.done() for f in futures) >= 16
                )
            )
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


def _refusal(env: dict[str, str]) -> str:
    proc = start({"LEVIT_HTTP_PORT": "0", "LEVIT_GRPC_PORT": "0", **env})
    _, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    [line] = [ln for ln in text.splitlines() if "cannot start" in ln]  # one line says why
    return line


def test_wrong_variant_checkpoint_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "LeViT-192-mine.pth"
    torch.save({"model": random_levit("LeViT_192").state_dict()}, path)
    line = _refusal({"LEVIT_WEIGHTS": str(path), "LEVIT_MODEL": "LeViT_128S"})
    assert "is a LeViT_192 checkpoint, but LeViT_128S was requested" in line


def test_unusable_cache_dir_refuses_to_start_when_pretrained_is_required() -> None:
    line = _refusal({"LEVIT_CACHE_DIR": "/dev/null/cache", "LEVIT_WEIGHTS": "auto", "LEVIT_REQUIRE_PRETRAINED": "1"})
    assert "/dev/null/cache" in line


def test_download_hash_mismatch_refuses_to_start(tmp_path: Path) -> None:
    import http.server
    import threading

    (tmp_path / "LeViT-128S-deadbeef.pth").write_bytes(b"definitely not those bytes")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/LeViT-128S-deadbeef.pth"
        line = _refusal({"LEVIT_WEIGHTS": url, "LEVIT_CACHE_DIR": str(tmp_path / "cache")})
        assert "hash mismatch" in line
    finally:
        httpd.shutdown()
