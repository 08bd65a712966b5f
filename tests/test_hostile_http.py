"""Hostile and broken HTTP input: every case gets its documented answer, nothing gets a 5xx, and
valid requests sent alongside all succeed with the right results."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import ServerThread, photo
from tests.corpus import cases
from tests.helpers import metric, scrape

CAT = photo("cat.jpg")


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    server = ServerThread(max_upload_bytes=2 * 1024 * 1024, read_timeout_s=1.0, max_batch_size=8).start()
    yield server
    server.stop()


def post_file(url: str, name: str, data: bytes, **kwargs) -> httpx.Response:
    files = [("img", (name, data, "application/octet-stream"))]
    return httpx.post(url + "/classify", files=files, timeout=60, **kwargs)


def _expected_predictions(url: str) -> list[int]:
    return [p["index"] for p in post_file(url, "cat.jpg", CAT).json()["results"][0]["predictions"]]


def test_corpus_in_parallel_with_valid_traffic(srv: ServerThread) -> None:
    corpus = cases()
    assert len(corpus) >= 40
    expected = _expected_predictions(srv.url)
    with ThreadPoolExecutor(8) as pool:
        valid = [pool.submit(post_file, srv.url, f"valid-{i}.jpg", CAT) for i in range(30)]
        hostile = {case: pool.submit(post_file, srv.url, case.name, case.data) for case in corpus}
        for case, future in hostile.items():
            response = future.result()
            assert response.status_code == case.status, (case.name, response.status_code, response.text)
            body = response.json()
            if case.status == 200:
                [result] = body["results"]
                assert result["filename"] == case.name and len(result["predictions"]) == 5
            else:
                assert case.name in body["error"]["message"], (case.name, body)
                if case.code:
                    assert body["error"]["code"] == case.code
        for future in valid:
            response = future.result()
            assert response.status_code == 200
            assert [p["index"] for p in response.json()["results"][0]["predictions"]] == expected
    assert metric(scrape(srv.url), "levit_request_duration_seconds_count", status="500") == 0


REQUEST_CASES = [
    ("wrong field name", dict(files=[("image", ("a.jpg", CAT))]), 400, "'img'"),
    ("text field instead of file", dict(data={"img": "not a file"}), 400, "'img'"),
    ("no body", dict(), 400, "multipart"),
    ("json body", dict(json={"img": "x"}), 400, "multipart"),
    ("100 files", dict(files=[("img", (f"{i}.jpg", b"x")) for i in range(100)]), 413, "more than 64 images"),
    ("over upload limit", dict(files=[("img", ("big.jpg", b"\xff\xd8" + b"\0" * 3_000_000))]), 413, "limit"),
    ("k=0", dict(files=[("img", ("a.jpg", CAT))], params={"k": 0}), 422, "k"),
    ("k=-1", dict(files=[("img", ("a.jpg", CAT))], params={"k": -1}), 422, "k"),
    ("k=1001", dict(files=[("img", ("a.jpg", CAT))], params={"k": 1001}), 422, "k"),
    ("k=abc", dict(files=[("img", ("a.jpg", CAT))], params={"k": "abc"}), 422, "k"),
    ("bad timeout header", dict(files=[("img", ("a.jpg", CAT))], headers={"X-Request-Timeout-Ms": "soon"}), 400, "Ms"),
    ("zero timeout header", dict(files=[("img", ("a.jpg", CAT))], headers={"X-Request-Timeout-Ms": "0"}), 400, "Ms"),
    ("huge header", dict(files=[("img", ("a.jpg", CAT))], headers={"X-Junk": "a" * 100_000}), 431, "header"),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "needle"), REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_malformed_requests(srv: ServerThread, name: str, kwargs: dict, status: int, needle: str) -> None:
    response = httpx.post(srv.url + "/classify", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_invalid_utf8_filename(srv: ServerThread) -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="img"; filename="caf\xe9\xff\xfe.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + CAT + b"\r\n--XyZ--\r\n"
    )
    response = httpx.post(
        srv.url + "/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["filename"].startswith("caf")


def test_slow_upload_is_cut_off_and_others_are_served(srv: ServerThread) -> None:
    """Slowloris-style: a client dribbling its body gets 408 after the read timeout; meanwhile others work."""
    host, port = "127.0.0.1", srv.server.http_port
    slow = [socket.create_connection((host, port)) for _ in range(5)]
    try:
        for sock in slow:
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n\xff"
            )
        assert post_file(srv.url, "cat.jpg", CAT).status_code == 200
        start = time.monotonic()
        for sock in slow:
            sock.settimeout(30)
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert time.monotonic() - start < 30
    finally:
        for sock in slow:
            sock.close()
    assert post_file(srv.url, "cat.jpg", CAT).status_code == 200


def test_bodies_never_reach_logs_and_paths_never_reach_the_disk(srv: ServerThread, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    marker = b"SECRET-BODY-MARKER-7f3a"
    traversal = post_file(srv.url, "../../../../etc/passwd", CAT + marker)
    assert traversal.status_code == 200
    assert traversal.json()["results"][0]["filename"] == "../../../../etc/passwd"  # echoed, never opened
    assert post_file(srv.url, "notes.txt", marker * 50).status_code == 415
    assert post_file(srv.url, "x.jpg", b"\xff\xd8" + marker).status_code == 422
    assert marker.decode() not in caplog.text
    assert caplog.records, "logging was captured"
