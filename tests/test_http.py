"""The HTTP API through real sockets: results, batching, errors, limits, deadlines, failures, metrics."""

from __future__ import annotations

import io
import socket
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench.loadgen import Payload, multipart_request
from service.runtime import ModelRuntime
from tests.conftest import Gate, ServerThread, photo, wait_until
from tests.helpers import metric, scrape

CAT = photo("cat.jpg")


def classify(url: str, files: list[tuple[str, bytes]], k: int | None = None, **kwargs) -> httpx.Response:
    params = {"k": k} if k is not None else None
    multipart = [("img", (name, data, "image/jpeg")) for name, data in files]
    kwargs.setdefault("timeout", 60)
    return httpx.post(url + "/classify", files=multipart, params=params, **kwargs)


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_photo_gets_sorted_top5(server: ServerThread) -> None:
    response = classify(server.url, [("cat.jpg", CAT)])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "LeViT_128S", "weights": "random(seed=0)"}
    [result] = body["results"]
    assert result["filename"] == "cat.jpg"
    scores = [p["score"] for p in result["predictions"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and sum(scores) <= 1.0
    first = result["predictions"][0]
    assert set(first) == {"index", "label", "wnid", "score"} and first["wnid"].startswith("n")
    assert response.headers["x-request-id"]


def test_k_and_raw_body(server: ServerThread) -> None:
    multipart = classify(server.url, [("cat.jpg", CAT)], k=12).json()
    raw = httpx.post(server.url + "/classify?k=12", content=CAT, headers={"Content-Type": "image/jpeg"}).json()
    assert len(raw["results"][0]["predictions"]) == 12
    assert raw["results"][0]["predictions"] == multipart["results"][0]["predictions"]


def test_multi_image_request_keeps_upload_order(server: ServerThread) -> None:
    names = ["coffee.jpg", "cat.jpg", "rocket.jpg", "astronaut.jpg", "cat.jpg"]
    together = classify(server.url, [(n, photo(n)) for n in names]).json()["results"]
    assert [r["filename"] for r in together] == names
    for name, result in zip(names, together):
        alone = classify(server.url, [(name, photo(name))]).json()["results"][0]
        assert [p["index"] for p in result["predictions"]] == [p["index"] for p in alone["predictions"]]
        for a, b in zip(result["predictions"], alone["predictions"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_request_id_is_echoed(server: ServerThread) -> None:
    response = httpx.get(server.url + "/healthz", headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_server_timing_tells_the_server_side_time(server: ServerThread) -> None:
    start = time.perf_counter()
    response = httpx.post(server.url + "/classify", files={"img": ("cat.jpg", photo("cat.jpg"))})
    round_trip_ms = (time.perf_counter() - start) * 1000
    name, _, duration = response.headers["server-timing"].partition(";dur=")
    assert name == "app" and 0 < float(duration) <= round_trip_ms


@pytest.mark.parametrize(
    ("files", "params", "status", "code", "needle"),
    [
        ([("notes.txt", b"hello, I am text")], None, 415, "unsupported_image", "notes.txt"),
        ([("cut.jpg", CAT[: len(CAT) // 2])], None, 422, "corrupt_image", "cut.jpg"),
        ([("bomb.png", png_bomb(40000, 40000))], None, 413, "image_too_large", "bomb.png"),
        ([("cat.jpg", CAT)], {"k": 0}, 422, "invalid_parameter", "k"),
        ([("cat.jpg", CAT)], {"k": 1001}, 422, "invalid_parameter", "k"),
        ([("cat.jpg", CAT)], {"k": "abc"}, 422, "invalid_parameter", "k"),
        ([("cat.jpg", CAT)], {"k": 101}, 400, "bad_request", "between 1 and 100"),
    ],
)
def test_bad_input_gets_json_error(server: ServerThread, files, params, status, code, needle) -> None:
    multipart = [("img", (name, data, "application/octet-stream")) for name, data in files]
    response = httpx.post(server.url + "/classify", files=multipart, params=params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"]


def test_request_shape_errors(server: ServerThread) -> None:
    wrong_field = httpx.post(server.url + "/classify", files=[("image", ("a.jpg", CAT, "image/jpeg"))])
    assert wrong_field.status_code == 400 and "'img'" in wrong_field.json()["error"]["message"]
    no_body = httpx.post(server.url + "/classify", headers={"Content-Type": "application/json"}, content=b"{}")
    assert no_body.status_code == 400 and no_body.json()["error"]["code"] == "bad_request"
    unknown = httpx.get(server.url + "/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = httpx.get(server.url + "/classify")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_upload_limit() -> None:
    srv = ServerThread(max_upload_bytes=64 * 1024).start()
    try:
        big = classify(srv.url, [("big.jpg", b"\xff\xd8" + b"\0" * 100_000)])
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"

        def chunked():
            for _ in range(100):
                yield b"\0" * 1024

        streamed = httpx.post(srv.url + "/classify", content=chunked(), headers={"Content-Type": "image/jpeg"})
        assert streamed.status_code == 413
        assert classify(srv.url, [("cat.jpg", CAT)]).status_code == 200  # still serving
    finally:
        srv.stop()


def test_large_multipart_upload_never_touches_the_temp_dir(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette spools a file part over 1 MB to a temporary file; in the hardened container /tmp is a 64 MiB
    tmpfs that a few such uploads at once would fill. A temp dir that does not exist makes any spill fail."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    noise = Image.frombytes("RGB", (1200, 1200), bytes(range(256)) * (1200 * 1200 * 3 // 256))
    buffer = io.BytesIO()
    noise.effect_spread(40).save(buffer, "JPEG", quality=98)
    assert buffer.tell() > 1.5 * 2**20, buffer.tell()
    response = classify(server.url, [("big.jpg", buffer.getvalue()), ("cat.jpg", CAT)])
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


def test_concurrent_requests_are_batched_with_identical_results(gate: Gate) -> None:
    srv = ServerThread(hook=gate, max_batch_size=8, max_batch_delay_ms=60_000).start()
    try:
        names = ["cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"] * 2
        alone = {n: classify(srv.url, [(n, photo(n))], k=3).json()["results"][0] for n in set(names)}
        before = scrape(srv.url)
        gate.close()
        with ThreadPoolExecutor(len(names) + 1) as pool:
            blocker = pool.submit(classify, srv.url, [("cat.jpg", CAT)])
            assert gate.entered.wait(30)  # the model thread is now held inside a batch
            futures = [pool.submit(classify, srv.url, [(n, photo(n))], 3) for n in names]
            wait_until(lambda: metric(scrape(srv.url), "levit_queue_depth") == len(names))
            gate.open.set()
            results = [f.result().json()["results"][0] for f in futures]
            assert blocker.result().status_code == 200
        assert gate.sizes[-1] == len(names)  # all eight waited together and ran as one batch
        for name, result in zip(names, results):
            assert [p["index"] for p in result["predictions"]] == [p["index"] for p in alone[name]["predictions"]]
            for a, b in zip(result["predictions"], alone[name]["predictions"]):
                assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        after = scrape(srv.url)
        assert metric(after, "levit_batch_size_count") - metric(before, "levit_batch_size_count") == 2
        assert metric(after, "levit_batch_size_sum") - metric(before, "levit_batch_size_sum") == len(names) + 1
    finally:
        gate.open.set()
        srv.stop()


def test_one_thread_builds_warms_and_runs_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second thread running torch work starts a second OpenMP team: 2.6x slower batches (batcher.py)."""
    threads: dict[str, set[int]] = {"warm": set(), "forward": set()}
    warm = ModelRuntime.warm.__func__

    def recording_warm(cls: type[ModelRuntime], settings):
        threads["warm"].add(threading.get_ident())
        return warm(cls, settings)

    monkeypatch.setattr(ModelRuntime, "warm", classmethod(recording_warm))
    names: set[str] = set()

    def hook(_: int) -> None:
        threads["forward"].add(threading.get_ident())
        names.add(Path("/proc/thread-self/comm").read_text().strip())  # read while the thread lives

    srv = ServerThread(hook=hook, max_batch_size=2).start()
    try:
        with ThreadPoolExecutor(4) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda _: classify(srv.url, [("c", CAT)]), range(8)))
    finally:
        srv.stop()
    assert len(threads["warm"]) == 1 and threads["forward"] == threads["warm"]
    assert names == {"levit-model_0"}  # the OS knows the pool's name: top -H shows it


def test_queue_full_is_refused_fast(gate: Gate) -> None:
    srv = ServerThread(hook=gate, max_batch_size=1, max_queue=2).start()
    try:
        gate.close()
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(classify, srv.url, [("cat.jpg", CAT)])
            assert gate.entered.wait(30)
            queued = [pool.submit(classify, srv.url, [("cat.jpg", CAT)]) for _ in range(2)]
            wait_until(lambda: metric(scrape(srv.url), "levit_queue_depth") == 2)
            refused = classify(srv.url, [("cat.jpg", CAT)])
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            gate.open.set()
            assert [f.result().status_code for f in [running, *queued]] == [200, 200, 200]
        assert metric(scrape(srv.url), "levit_rejections_total", reason="queue_full") >= 1
    finally:
        gate.open.set()
        srv.stop()


def test_deadline_expires_in_queue_and_is_not_computed(gate: Gate) -> None:
    srv = ServerThread(hook=gate, max_batch_size=4).start()
    dropped = metric(scrape(srv.url), "levit_images_dropped_total", reason="deadline")  # process-wide counter
    try:
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(classify, srv.url, [("cat.jpg", CAT)])
            assert gate.entered.wait(30)
            late = classify(srv.url, [("a.jpg", CAT), ("b.jpg", CAT)], headers={"X-Request-Timeout-Ms": "200"})
            assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
            gate.open.set()
            assert running.result().status_code == 200
        assert classify(srv.url, [("cat.jpg", CAT)]).status_code == 200
        assert gate.sizes == [1, 1]  # the two expired images never reached the model
        assert metric(scrape(srv.url), "levit_images_dropped_total", reason="deadline") - dropped == 2
    finally:
        gate.open.set()
        srv.stop()


def test_model_failure_fails_only_that_batch(gate: Gate) -> None:
    srv = ServerThread(hook=gate).start()
    try:
        gate.fail_next = True
        failed = classify(srv.url, [("cat.jpg", CAT)])
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_error"
        ok = classify(srv.url, [("cat.jpg", CAT)])
        assert ok.status_code == 200
        assert httpx.get(srv.url + "/readyz").status_code == 200
    finally:
        srv.stop()


def test_client_disconnect_drops_queued_work(gate: Gate) -> None:
    srv = ServerThread(hook=gate, max_batch_size=1).start()
    before = scrape(srv.url)  # the counters are process-wide: compare with what they said before
    rejected = metric(before, "levit_rejections_total", reason="cancelled")
    dropped = metric(before, "levit_images_dropped_total", reason="cancelled")
    try:
        gate.close()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(classify, srv.url, [("cat.jpg", CAT)])
            assert gate.entered.wait(30)
            with pytest.raises(httpx.ReadTimeout):
                classify(srv.url, [("gone.jpg", CAT)], timeout=httpx.Timeout(60, read=0.5))
            wait_until(lambda: metric(scrape(srv.url), "levit_rejections_total", reason="cancelled") == rejected + 1)
            gate.open.set()
            assert running.result().status_code == 200
        wait_until(lambda: metric(scrape(srv.url), "levit_images_dropped_total", reason="cancelled") == dropped + 1)
        assert gate.sizes == [1]  # the abandoned image was never computed
    finally:
        gate.open.set()
        srv.stop()


def test_client_gone_mid_upload_is_cancelled_not_an_error(server: ServerThread) -> None:
    """A client that closes its connection halfway through its upload: 499 `cancelled` in the metrics (the
    client's doing), not a 500 with a traceback; its place in the queue bound is given back."""
    before = scrape(server.url)
    cancelled = metric(before, "levit_request_duration_seconds_count", route="/classify", status="499")
    errors = metric(before, "levit_request_duration_seconds_count", route="/classify", status="500")
    port = int(server.url.rsplit(":", 1)[1])
    request = multipart_request("127.0.0.1", port, Payload("cat.jpg", CAT))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as upload:
        upload.sendall(request[: len(request) // 2])

    def counted() -> float:
        return metric(scrape(server.url), "levit_request_duration_seconds_count", route="/classify", status="499")

    wait_until(lambda: counted() == cancelled + 1)
    after = scrape(server.url)
    assert metric(after, "levit_request_duration_seconds_count", route="/classify", status="500") == errors
    assert server.server.service.model.admitted == 0
    assert classify(server.url, [("cat.jpg", CAT)]).status_code == 200


def test_drain_finishes_admitted_work_then_exits_cleanly(gate: Gate) -> None:
    srv = ServerThread(hook=gate, max_batch_size=2).start()
    gate.close()
    with ThreadPoolExecutor(4) as pool:
        inflight = [pool.submit(classify, srv.url, [(f"{i}.jpg", CAT)]) for i in range(4)]
        wait_until(lambda: gate.entered.is_set() and metric(scrape(srv.url), "levit_queue_depth") + gate.held == 4)
        srv.loop.call_soon_threadsafe(srv.server.request_stop)
        wait_until(lambda: httpx.get(srv.url + "/readyz").status_code == 503)
        refused = classify(srv.url, [("new.jpg", CAT)])
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        gate.open.set()
        assert [f.result().status_code for f in inflight] == [200] * 4
    assert srv.stop() == 0


def test_metrics_parse_and_move(server: ServerThread) -> None:
    before = scrape(server.url)
    assert classify(server.url, [("cat.jpg", CAT)]).status_code == 200
    after = scrape(server.url)
    for name in (
        "levit_queue_wait_seconds_count",
        "levit_batch_size_count",
        "levit_model_forward_seconds_count",
        "levit_preprocess_seconds_count",
        "levit_images_classified_total",
    ):
        assert metric(after, name) > metric(before, name), name
    labels = {"protocol": "http", "route": "/classify", "status": "200"}
    assert metric(after, "levit_request_duration_seconds_count", **labels) > metric(
        before, "levit_request_duration_seconds_count", **labels
    )
    assert metric(after, "levit_model_info", variant="LeViT_128S", weights="random(seed=0)") == 1
    for name in ("levit_queue_depth", "levit_inflight_requests"):
        assert any(n == name for n, _ in after), name


def test_model_metadata_and_health(server: ServerThread) -> None:
    info = httpx.get(server.url + "/v1/model").json()
    assert info["name"] == "LeViT_128S" and info["weights"]["source"] == "random"
    assert info["parameters"] > 7_000_000 and 300e6 < info["macs_per_image"] < 310e6
    assert info["input_size"] == [3, 224, 224] and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["batching"]["max_batch_size"] == 8
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}


def test_docs_work_offline(server: ServerThread) -> None:
    page = httpx.get(server.url + "/docs").text
    assert "/static/swagger/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert httpx.get(server.url + "/static/swagger/swagger-ui-bundle.js").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    operation = schema["paths"]["/classify"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(operation["requestBody"]["content"])
    [k] = [p for p in operation["parameters"] if p["name"] == "k"]
    assert k["in"] == "query" and k["schema"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert {"200", "405", "413", "503"} <= set(operation["responses"])


def test_images_of_every_format(server: ServerThread) -> None:
    image = Image.open(io.BytesIO(CAT)).convert("RGB")
    for fmt in ("PNG", "WEBP", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        response = classify(server.url, [(f"cat.{fmt.lower()}", buffer.getvalue())])
        assert response.status_code == 200, (fmt, response.text)


def test_images_being_decoded_or_uploaded_count_toward_the_queue_bound() -> None:
    """Admission refuses at once when queued, decoding and uploading work fills the bound: counting only the
    queue admitted surge requests that were read and decoded behind a backlog and refused after it, 50-750 ms
    later. An admitted request holds one place until its images are counted, then exactly as many as it has."""
    from service.batching.local import LocalModel
    from service.core import Phase, Service
    from service.errors import QueueFull
    from service.settings import Settings

    settings = Settings(max_queue=4, weights="random")
    model = LocalModel(settings)
    service = Service(settings, model)
    service.phase = Phase.READY
    full = pytest.raises(QueueFull, match="4 of 4 images queued, decoding or uploading")
    with model.decoding(2), service.admission() as uploading:  # 2 + 1 fits the bound of 4; it holds its place
        assert model.admitted == 3
        with service.admission():  # the last place
            assert model.admitted == 4
            with full, service.admission():
                pass
        assert model.admitted == 3  # a request that ends (an upload error, say) gives its place back
        uploading.release()  # what `probabilities` does just before it counts the request's images
        uploading.release()  # once only
        assert model.admitted == 2
    assert model.admitted == 0
    with service.admission():
        assert model.admitted == 1
