"""The client side of tests/test_v2_tools.py, run by the tritonclient venv's python (scripts/v2_tools.sh).

tritonclient pins protobuf < 7 and so cannot share the server's venv: the test starts a real server, runs this
script as a subprocess against it, and asserts on what it prints. This script only calls, unchanged, the
standard clients (tritonclient.http and tritonclient.grpc) and reports what they returned, as one JSON object
on stdout; exceptions are reported, not raised, so the test can assert on error statuses too.

    python tests/v2_triton_client.py PLAN.json      (see test_v2_tools.py for the plan's keys)
    python tests/v2_triton_client.py --descriptors  (tritonclient's own grpc_service/model_config descriptors)
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any


def _call(fn, *args, **kwargs) -> Any:
    from tritonclient.utils import InferenceServerException

    try:
        return {"ok": fn(*args, **kwargs)}
    except InferenceServerException as error:
        return {"error": error.message(), "status": error.status()}


def _decode(array: Any) -> Any:
    """BYTES results: bytes from the binary form, str from JSON (tritonclient returns each as it came)."""
    return [[s.decode() if isinstance(s, bytes) else s for s in row] for row in array.tolist()]


def http_checks(plan: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import tritonclient.http as httpclient

    model = plan["model"]
    images = [Path(p).read_bytes() for p in plan["images"]]
    pixels = np.load(plan["pixels"])
    client = httpclient.InferenceServerClient(url=plan["http"], network_timeout=60.0)
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "alias_ready": client.is_model_ready("levit"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata(model),
        "model_config": client.get_model_config(model),
    }

    def image_input(binary: bool = True) -> Any:
        tensor = httpclient.InferInput("image", [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_), binary_data=binary)
        return tensor

    result = client.infer(model, [image_input()], outputs=[httpclient.InferRequestedOutput("probabilities")])
    out["bytes_probabilities"] = result.as_numpy("probabilities").tolist()
    result = client.infer(
        model, [image_input()], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=plan["k"])]
    )
    out["bytes_classification"] = _decode(result.as_numpy("probabilities"))
    # No outputs named: the client asks for every output in binary form (request parameter binary_data_output).
    result = client.infer("levit", [image_input()], request_id="req-7")
    out["alias_default_outputs"] = {
        "probabilities": result.as_numpy("probabilities").tolist(),
        "response": result.get_response(),
    }
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities")])
    out["fp32_probabilities"] = result.as_numpy("probabilities").tolist()
    # All JSON (no binary extension): the FP32 input as numbers, the classification strings in the JSON body.
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer(
        model,
        [tensor],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=plan["k"])],
        request_compression_algorithm="gzip",
    )
    out["fp32_json_classification"] = _decode(result.as_numpy("probabilities"))
    result = client.infer(model, [image_input()], timeout=60_000_000)  # Triton's "timeout" parameter: microseconds
    out["with_timeout_parameter"] = result.as_numpy("probabilities").shape
    out["unknown_model"] = _call(client.infer, "nope", [image_input()])
    out["unknown_model_metadata"] = _call(client.get_model_metadata, "nope")
    bad = httpclient.InferInput("image", [1, 1], "INT32")
    bad.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    out["wrong_datatype"] = _call(client.infer, model, [bad])
    out["unknown_output"] = _call(
        client.infer, model, [image_input()], outputs=[httpclient.InferRequestedOutput("logits")]
    )
    corrupt = httpclient.InferInput("image", [1, 1], "BYTES")
    corrupt.set_data_from_numpy(np.array([[b"not an image"]], dtype=np.object_))
    out["corrupt_image"] = _call(client.infer, model, [corrupt])
    client.close()
    return out


def grpc_checks(plan: dict[str, Any]) -> dict[str, Any]:
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    model = plan["model"]
    images = [Path(p).read_bytes() for p in plan["images"]]
    pixels = np.load(plan["pixels"])
    client = grpcclient.InferenceServerClient(url=plan["grpc"])
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "alias_ready": client.is_model_ready("levit"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "model_config": client.get_model_config(model, as_json=True),
    }

    def image_input() -> Any:
        tensor = grpcclient.InferInput("image", [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
        return tensor

    result = client.infer(model, [image_input()], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    out["bytes_probabilities"] = result.as_numpy("probabilities").tolist()
    result = client.infer(
        model, [image_input()], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=plan["k"])]
    )
    out["bytes_classification"] = _decode(result.as_numpy("probabilities"))
    result = client.infer("levit", [image_input()], request_id="req-8", client_timeout=60)
    out["alias_default_outputs"] = {
        "probabilities": result.as_numpy("probabilities").tolist(),
        "response": result.get_response(as_json=True),
    }
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    out["fp32_probabilities"] = result.as_numpy("probabilities").tolist()
    result = client.infer(model, [image_input()], timeout=60_000_000)
    out["with_timeout_parameter"] = result.as_numpy("probabilities").shape

    # The bidirectional stream: two good requests and a bad one, answered on one stream.
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer(model, [image_input()], request_id="s1")
    corrupt = grpcclient.InferInput("image", [1], "BYTES")
    corrupt.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    client.async_stream_infer(model, [corrupt], request_id="s2")
    client.async_stream_infer(
        model, [image_input()], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)],
        request_id="s3",
    )  # fmt: skip
    stream: dict[str, Any] = {}
    errors = []
    for _ in range(3):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors.append(error.message())
        else:
            response = result.get_response()
            data = result.as_numpy("probabilities")
            stream[response.id] = _decode(data) if data.dtype == np.object_ else data.tolist()
    client.stop_stream()
    out["stream"] = {"results": stream, "errors": errors}

    out["unknown_model"] = _call(client.infer, "nope", [image_input()])
    out["unknown_model_metadata"] = _call(client.get_model_metadata, "nope")
    bad = grpcclient.InferInput("image", [1, 1], "INT32")
    bad.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    out["wrong_datatype"] = _call(client.infer, model, [bad])
    out["unknown_output"] = _call(
        client.infer, model, [image_input()], outputs=[grpcclient.InferRequestedOutput("logits")]
    )
    out["corrupt_image"] = _call(client.infer, model, [corrupt])
    out["deadline"] = _call(client.infer, model, [image_input()], client_timeout=plan.get("tiny_timeout_s", 1e-6))
    client.close()
    return out


def descriptors() -> dict[str, Any]:
    """Every message, enum and service of tritonclient's protos: field numbers, types, labels, type names."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    found: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}

    def message(prefix: str, proto: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{proto.name}"
        found["messages"][name] = {
            f.name: [f.number, f.type, f.label, f.type_name, f.HasField("oneof_index")] for f in proto.field
        }
        for nested in proto.nested_type:
            message(name, nested)
        for enum in proto.enum_type:
            found["enums"][f"{name}.{enum.name}"] = {v.name: v.number for v in enum.value}

    for module in (service_pb2, model_config_pb2):
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        for proto in file.message_type:
            message("." + file.package, proto)
        for enum in file.enum_type:
            found["enums"][f".{file.package}.{enum.name}"] = {v.name: v.number for v in enum.value}
        for service in file.service:
            found["services"][f".{file.package}.{service.name}"] = {
                m.name: [m.input_type, m.output_type, m.client_streaming, m.server_streaming] for m in service.method
            }
    return found


def main(argv: list[str]) -> int:
    if argv == ["--descriptors"]:
        print(json.dumps(descriptors()))
        return 0
    with open(argv[0]) as f:
        plan = json.load(f)
    out: dict[str, Any] = {}
    for name, checks in (("http", http_checks), ("grpc", grpc_checks)):
        try:
            out[name] = checks(plan)
        except Exception:
            out[name] = {"crashed": traceback.format_exc()}
    print(json.dumps(out, default=lambda value: repr(value)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
