"""The standard Open Inference Protocol tools against a live server, unchanged: tritonclient[http] and
tritonclient[grpc] from PyPI, and Triton's perf_analyzer. They pin protobuf/numpy versions the server cannot
use, so scripts/v2_tools.sh installs them into their own venvs under .tools/; the clients run as a subprocess
(tests/v2_triton_client.py) against the server this module starts. A tool that cannot be installed fails
these tests: it is never a skip."""

from __future__ import annotations

import base64
import csv
import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.grpc.gen.inference import grpc_service_pb2, model_config_pb2
from service.imaging import load_image_tensor
from tests.conftest import PHOTOS, ROOT, ServerThread, photo, wait_until
from tests.helpers import metric, scrape
from tests.test_v2 import assert_same, assert_same_labels

TOOLS = ROOT / ".tools"
CLIENT_PYTHON = TOOLS / "tritonclient" / "bin" / "python"
PERF_ANALYZER = TOOLS / "bin" / "perf_analyzer"
MODEL = "LeViT_128S"
NAMES = ["cat.jpg", "coffee.jpg"]
K = 5
pytestmark = pytest.mark.timeout(900)  # a first install (PyPI, Debian) counts in the first test's setup


@pytest.fixture(scope="module")
def tools() -> None:
    """Install (or find, in well under a second) the pinned tools; any failure fails the tests."""
    try:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "v2_tools.sh"), "all"], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"scripts/v2_tools.sh did not finish in {error.timeout} s")
    if done.returncode != 0:
        pytest.fail(f"scripts/v2_tools.sh failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    assert CLIENT_PYTHON.exists() and PERF_ANALYZER.exists()


@pytest.fixture(scope="module")
def live(tools: None) -> Iterator[ServerThread]:
    srv = ServerThread(max_batch_size=8).start()
    wait_until(lambda: srv.server.grpc_port is not None)
    yield srv
    srv.stop()


def run_client(*args: str) -> dict:
    done = subprocess.run(
        [str(CLIENT_PYTHON), str(ROOT / "tests" / "v2_triton_client.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def classify(url: str, names: list[str], k: int) -> list[list[dict]]:
    files = [("img", (n, photo(n), "image/jpeg")) for n in names]
    response = httpx.post(url + "/classify", files=files, params={"k": k}, timeout=60)
    assert response.status_code == 200, response.text
    return [r["predictions"] for r in response.json()["results"]]


def assert_probabilities(rows: list[list[float]], expected: list[list[dict]]) -> None:
    assert_same(np.array(rows, dtype=np.float32), expected)


def assert_labels(rows: list[list[str]], expected: list[list[dict]]) -> None:
    assert len(rows) == len(expected) and all(len(row) == len(rows[0]) for row in rows)
    assert_same_labels([text for row in rows for text in row], len(rows[0]), expected)


def test_tritonclient_http_and_grpc_unchanged(live: ServerThread, tmp_path: Path) -> None:
    pixels = load_image_tensor(photo("cat.jpg"), filename="cat.jpg", max_pixels=50_000_000, exact=False)
    np.save(tmp_path / "pixels.npy", pixels.unsqueeze(0).numpy())
    plan = {
        "model": MODEL,
        "http": f"127.0.0.1:{live.server.http_port}",
        "grpc": f"127.0.0.1:{live.server.grpc_port}",
        "images": [str(PHOTOS / n) for n in NAMES],
        "pixels": str(tmp_path / "pixels.npy"),
        "k": K,
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    expected = classify(live.url, NAMES, K)
    results = run_client(str(tmp_path / "plan.json"))
    for protocol in ("http", "grpc"):
        got = results[protocol]
        assert "crashed" not in got, got.get("crashed")
        assert got["live"] is got["ready"] is got["model_ready"] is got["alias_ready"] is True, protocol
        metadata = got["server_metadata"]
        assert metadata["name"] == "levit-serve"
        assert set(metadata["extensions"]) == {"classification", "binary_tensor_data", "model_configuration"}
        model = got["model_metadata"]
        assert model["name"] == MODEL and [i["name"] for i in model["inputs"]] == ["image", "pixels"]
        assert [int(d) for d in model["inputs"][0]["shape"]] == [-1, 1]  # gRPC's JSON has int64 as strings
        config = got["model_config"].get("config", got["model_config"])  # gRPC wraps it in ModelConfigResponse
        assert config["max_batch_size"] == 8 and "dynamic_batching" in config
        assert_probabilities(got["bytes_probabilities"], expected)
        assert_labels(got["bytes_classification"], expected)
        assert_probabilities(got["alias_default_outputs"]["probabilities"], expected)
        assert_probabilities(got["fp32_probabilities"], expected[:1])
        assert got["with_timeout_parameter"] == [2, 1000]
        assert "unknown model 'nope'" in got["unknown_model"]["error"]
        assert "unknown model 'nope'" in got["unknown_model_metadata"]["error"]
        assert "must be BYTES" in got["wrong_datatype"]["error"]
        assert "unknown output 'logits'" in got["unknown_output"]["error"]
        assert "image[0]" in got["corrupt_image"]["error"]
    http, grpc = results["http"], results["grpc"]
    assert_labels(http["fp32_json_classification"], expected[:1])
    assert http["alias_default_outputs"]["response"]["id"] == "req-7"
    assert http["alias_default_outputs"]["response"]["model_name"] == MODEL
    assert grpc["alias_default_outputs"]["response"]["id"] == "req-8"
    for name in ("unknown_model", "unknown_model_metadata"):
        assert http[name]["status"] == "404" and grpc[name]["status"] == "StatusCode.NOT_FOUND"
    for name in ("wrong_datatype", "unknown_output", "corrupt_image"):
        assert http[name]["status"] == "400" and grpc[name]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert grpc["deadline"]["status"] == "StatusCode.DEADLINE_EXCEEDED"
    stream = grpc["stream"]
    assert stream["errors"] == ["image 'image[0]' is not a JPEG, PNG, WebP, GIF, BMP or TIFF image"]
    assert set(stream["results"]) == {"s1", "s3"}
    assert_probabilities(stream["results"]["s1"], expected)
    assert_labels(stream["results"]["s3"], [p[:2] for p in expected])


def test_proto_is_wire_compatible_with_tritonclients(tools: None) -> None:
    """Every message, field number, type, label and enum value of proto/inference/ as tritonclient has them."""
    theirs = run_client("--descriptors")
    ours: dict = {"messages": {}, "enums": {}, "services": {}}

    def walk(prefix: str, message) -> None:
        name = f"{prefix}.{message.name}"
        fields = {}
        for f in message.fields:
            type_name = f".{f.message_type.full_name}" if f.message_type else ""
            type_name = f".{f.enum_type.full_name}" if f.enum_type else type_name
            fields[f.name] = [f.number, f.type, 3 if f.is_repeated else 1, type_name, f.containing_oneof is not None]
        ours["messages"][name] = fields
        for nested in message.nested_types:
            walk(name, nested)
        for enum in message.enum_types:
            ours["enums"][f"{name}.{enum.name}"] = {v.name: v.number for v in enum.values}

    for module in (grpc_service_pb2, model_config_pb2):
        file = module.DESCRIPTOR
        for message in file.message_types_by_name.values():
            walk("." + file.package, message)
        for enum in file.enum_types_by_name.values():
            ours["enums"][f".{file.package}.{enum.name}"] = {v.name: v.number for v in enum.values}
        for service in file.services_by_name.values():
            ours["services"][f".{file.package}.{service.name}"] = {
                m.name: [f".{m.input_type.full_name}", f".{m.output_type.full_name}", m.client_streaming,
                         m.server_streaming]
                for m in service.methods
            }  # fmt: skip
    assert len(ours["messages"]) > 30
    for kind in ("messages", "enums", "services"):
        for name, members in ours[kind].items():
            assert name in theirs[kind], f"{name} is not in tritonclient's protos"
            for member, value in members.items():
                assert theirs[kind][name].get(member) == value, (kind, name, member, value)


def perf_input(tmp_path: Path) -> Path:
    raw = photo("cat.jpg")  # perf_analyzer's b64 is the tensor as sent: BYTES elements length-prefixed
    path = tmp_path / "input.json"
    element = base64.b64encode(struct.pack("<I", len(raw)) + raw).decode()
    path.write_text(json.dumps({"data": [{"image": {"b64": element}}]}))
    return path


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_against_the_server(live: ServerThread, protocol: str, tmp_path: Path) -> None:
    """Bounded: 24 requests at concurrency 2, one cat photo each (scripts/v2_perf.py makes the numbers)."""
    port = live.server.http_port if protocol == "http" else live.server.grpc_port
    route = "/v2/models/{name}/infer" if protocol == "http" else "/inference.GRPCInferenceService/ModelInfer"
    config = "/v2/models/{name}/config" if protocol == "http" else "/inference.GRPCInferenceService/ModelConfig"
    ok = "200" if protocol == "http" else "OK"
    label = f"v2-{protocol}"

    def count(route: str, status: str | None = None) -> float:
        labels = {"protocol": label, "route": route, **({"status": status} if status else {})}
        return metric(scrape(live.url), "levit_request_duration_seconds_count", **labels)

    before = {"ok": count(route, ok), "all": count(route), "config": count(config, ok)}
    command = [
        str(PERF_ANALYZER), "-m", "levit", "-i", protocol, "-u", f"127.0.0.1:{port}",
        "--input-data", str(perf_input(tmp_path)), "--concurrency-range", "2", "--request-count", "24",
        "-f", str(tmp_path / "perf.csv"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = list(csv.DictReader((tmp_path / "perf.csv").open()))
    assert float(row["Inferences/Second"]) > 0
    assert count(config, ok) >= before["config"] + 1  # perf_analyzer read the model configuration
    served = count(route, ok) - before["ok"]
    assert served >= 24 and count(route) - before["all"] == served  # every request answered, none failed
