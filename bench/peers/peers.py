"""The peers as data: how each server is started, asked whether it is ready, sent an image, and read.

Every peer serves the same checkpoint (`.peers/levit_128s.pth`) the way its own docs tell a user to,
with its own batching on. The code that runs *inside* a peer lives in `servers/` and uses only that
peer's virtual environment; this module runs in the benchmark's process (the repo's .venv) and only
writes config files, builds command lines and request bytes, and parses answers.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import Payload, multipart_body

REPO = Path(__file__).resolve().parents[2]
PEERS_DIR = REPO / ".peers"
SERVERS = Path(__file__).resolve().parent / "servers"
CHECKPOINT = PEERS_DIR / "levit_128s.pth"
HOST = "127.0.0.1"  # every peer binds loopback only
MODEL = "levit_128s"
MAX_BATCH_SIZE = 16  # every batching peer: 16 images, 10 ms wait (the peers' own config files say so too)
MAX_BATCH_DELAY_MS = 10

Answer = tuple[list[int], list[float]]  # top-5 class indices, best first, and their probabilities


@dataclass
class Launch:
    """What one start of a peer gets: free ports by name, a scratch folder (its configs and logs), the weights."""

    ports: dict[str, int]
    workdir: Path
    checkpoint: Path


@dataclass(frozen=True)
class Peer:
    """One server under test. `command` may write config files into the launch's workdir first."""

    name: str
    venv: Path  # the virtual environment whose Python runs it
    port_names: tuple[str, ...]  # the first is the one requests go to
    command: Callable[[Launch], list[str]]
    ready: Callable[[Launch], bool]
    request: Callable[[Payload], tuple[str, str, str, bytes]]  # method, path, content type, body
    answer: Callable[[bytes], Answer]  # a 200 body -> the top-5 (raises when it holds none)
    env: Callable[[Launch], dict[str, str]] = lambda launch: {}
    stop: Callable[[Launch], None] | None = None  # a graceful stop tried before the process group is killed
    packages: tuple[str, ...] = ()  # distributions whose versions the report names
    ready_timeout_s: float = 180.0
    exact: bool = True  # top-5 indices must equal the reference's; False: top-1 only (own decode/model)
    setup: str = ""  # one line for the report: how it is configured

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


# --- request bodies and answers --------------------------------------------------------------------------


def multipart_post(path: str, field_name: str = "img") -> Callable[[Payload], tuple[str, str, str, bytes]]:
    def build(payload: Payload) -> tuple[str, str, str, bytes]:
        content_type, body = multipart_body(payload, field_name)
        return "POST", path, content_type, body

    return build


def raw_post(path: str) -> Callable[[Payload], tuple[str, str, str, bytes]]:
    """The image as the request body (TorchServe's examples: `curl URL -T kitten.jpg`)."""
    return lambda payload: ("POST", path, payload.content_type, payload.data)


def v2_infer(payload: Payload) -> tuple[str, str, str, bytes]:
    """Open Inference (v2) protocol JSON: one base64 BYTES input of shape [1]."""
    request = {
        "inputs": [
            {
                "name": "img",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(payload.data).decode()],
                "parameters": {"content_type": "base64"},
            }
        ]
    }
    return "POST", f"/v2/models/{MODEL}/infer", "application/json", json.dumps(request).encode()


def _checked(indices: list[int], scores: list[float]) -> Answer:
    if len(indices) != 5 or len(scores) != 5:
        raise ValueError(f"expected 5 predictions, got {indices!r}")
    return [int(i) for i in indices], [float(s) for s in scores]


def top5_json(body: bytes) -> Answer:
    """The servers/ apps' answer: {"indices": [...], "scores": [...]}."""
    answer = json.loads(body)
    return _checked(answer["indices"], answer["scores"])


def v2_outputs(body: bytes) -> Answer:
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    return _checked(outputs["indices"], outputs["scores"])


def levit_serve_json(body: bytes) -> Answer:
    predictions = json.loads(body)["results"][0]["predictions"]
    return _checked([p["index"] for p in predictions], [p["score"] for p in predictions])


# --- readiness -------------------------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET on loopback; (0, b"") when nothing answers yet."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def ok(port_name: str, path: str) -> Callable[[Launch], bool]:
    return lambda launch: http_get(launch.ports[port_name], path)[0] == 200


def torchserve_workers(launch: Launch) -> list[str]:
    """Status of each worker of the model, from TorchServe's management API (describe model)."""
    status, body = http_get(launch.ports["management"], f"/models/{MODEL}")
    if status != 200:
        return []
    return [w.get("status", "") for entry in json.loads(body) for w in entry.get("workers", [])]


def torchserve_ready(launch: Launch) -> bool:
    """/ping answers before a worker has loaded the model: ready is every worker READY."""
    workers = torchserve_workers(launch)
    return bool(workers) and all(s == "READY" for s in workers)


# --- commands --------------------------------------------------------------------------------------------


def torchserve_command(workers: int | None) -> Callable[[Launch], list[str]]:
    """Archive the model (handler, checkpoint, model config) and write config.properties, as TorchServe's
    docs do it. `workers` None leaves TorchServe's default worker count (one per core on a CPU machine)."""

    def command(launch: Launch) -> list[str]:
        bin_dir = PEERS_DIR / "torchserve" / "bin"
        store = launch.workdir / "model-store"
        store.mkdir()
        subprocess.run(
            [
                str(bin_dir / "torch-model-archiver"),
                "--model-name", MODEL,
                "--version", "1.0",
                "--serialized-file", str(launch.checkpoint),
                "--handler", str(SERVERS / "torchserve_handler.py"),
                "--extra-files", str(SERVERS / "peer_model.py"),
                "--config-file", str(SERVERS / "torchserve_model_config.yaml"),
                "--export-path", str(store),
            ],
            check=True, capture_output=True, cwd=launch.workdir,
        )  # fmt: skip
        p = launch.ports
        lines = [
            f"inference_address=http://{HOST}:{p['inference']}",
            f"management_address=http://{HOST}:{p['management']}",
            f"metrics_address=http://{HOST}:{p['metrics']}",
            f"grpc_inference_address={HOST}",
            f"grpc_inference_port={p['grpc_inference']}",
            f"grpc_management_address={HOST}",
            f"grpc_management_port={p['grpc_management']}",
            f"initial_worker_port={p['worker']}",  # its workers' sockets: /tmp/.ts.sock.<port>, unique per start
            "disable_system_metrics=true",  # the once-a-minute system metrics collector: not needed here
            "enable_metrics_api=false",
        ]
        if workers is not None:
            lines.append(f"default_workers_per_model={workers}")
        config = launch.workdir / "config.properties"
        config.write_text("\n".join(lines) + "\n")
        return [
            str(bin_dir / "torchserve"),
            "--start", "--foreground", "--ncs",
            "--model-store", str(store),
            "--models", f"{MODEL}={MODEL}.mar",
            "--ts-config", str(config),
            "--disable-token-auth",
        ]  # fmt: skip

    return command


def torchserve_env(launch: Launch) -> dict[str, str]:
    # TMPDIR: its pid file (tempfile.gettempdir()/.model_server.pid, read by `torchserve --stop`) per start
    logs = str(launch.workdir / "logs")
    return {"TMPDIR": str(launch.workdir), "LOG_LOCATION": logs, "METRICS_LOCATION": logs}


def torchserve_stop(launch: Launch) -> None:
    subprocess.run(
        [str(PEERS_DIR / "torchserve" / "bin" / "torchserve"), "--stop"],
        env={**os.environ, **torchserve_env(launch)},
        capture_output=True,
        timeout=60,
        check=False,
    )


def litserve_command(launch: Launch) -> list[str]:
    return [str(PEERS_DIR / "litserve" / "bin" / "python"), str(SERVERS / "litserve_app.py"),
            str(launch.ports["http"]), str(launch.checkpoint)]  # fmt: skip


def mlserver_command(launch: Launch) -> list[str]:
    """settings.json (server) and model-settings.json (the model, its runtime class, adaptive batching)."""
    p = launch.ports
    settings = {
        "host": HOST,
        "http_port": p["http"],
        "grpc_port": p["grpc"],
        "metrics_port": p["metrics"],
        "metrics_endpoint": None,  # no Prometheus endpoint: not needed here
    }
    model = {
        "name": MODEL,
        "implementation": "mlserver_runtime.LeViTRuntime",
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_DELAY_MS / 1000,
        "parameters": {"uri": str(launch.checkpoint)},
    }
    (launch.workdir / "settings.json").write_text(json.dumps(settings, indent=2))
    (launch.workdir / "model-settings.json").write_text(json.dumps(model, indent=2))
    return [str(PEERS_DIR / "mlserver" / "bin" / "mlserver"), "start", str(launch.workdir)]


def fastapi_command(launch: Launch) -> list[str]:
    return [str(PEERS_DIR / "fastapi" / "bin" / "python"), "-m", "uvicorn", "fastapi_app:app",
            "--app-dir", str(SERVERS), "--host", HOST, "--port", str(launch.ports["http"]),
            "--workers", "1"]  # fmt: skip


def levit_serve_python() -> Path:
    return REPO / ".venv" / "bin" / "python"


def levit_serve_env(launch: Launch) -> dict[str, str]:
    return {
        "LEVIT_WEIGHTS": str(launch.checkpoint),
        "LEVIT_HOST": HOST,
        "LEVIT_HTTP_PORT": str(launch.ports["http"]),
        "LEVIT_GRPC_PORT": str(launch.ports["grpc"]),
    }


def servers_path(launch: Launch) -> dict[str, str]:
    """The peer's own code (servers/) importable, nothing of this repo."""
    return {"PYTHONPATH": str(SERVERS)}


def _torchserve(name: str, workers: int | None, setup: str) -> Peer:
    return Peer(
        name=name,
        venv=PEERS_DIR / "torchserve",
        port_names=("inference", "management", "metrics", "grpc_inference", "grpc_management", "worker"),
        command=torchserve_command(workers),
        ready=torchserve_ready,
        request=raw_post(f"/predictions/{MODEL}"),
        answer=top5_json,
        env=torchserve_env,
        stop=torchserve_stop,
        packages=("torchserve", "torch-model-archiver"),
        setup=setup,
    )


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            name="levit-serve",
            venv=REPO / ".venv",
            port_names=("http", "grpc"),
            command=lambda launch: [str(levit_serve_python()), "-m", "service"],
            ready=ok("http", "/readyz"),
            request=multipart_post("/classify"),
            answer=levit_serve_json,
            env=levit_serve_env,
            packages=("levit-serve",),
            ready_timeout_s=300.0,  # the first start compiles its engine artifacts (~80 s on 2 cores)
            exact=False,
            setup="python -m service, defaults (LEVIT_WEIGHTS = the shared checkpoint); multipart POST /classify",
        ),
        _torchserve(
            "torchserve",
            None,
            f"custom handler, batchSize {MAX_BATCH_SIZE}, maxBatchDelay {MAX_BATCH_DELAY_MS} ms, default workers; "
            "raw-body POST /predictions",
        ),
        _torchserve(
            "torchserve-1w",
            1,
            "as torchserve, default_workers_per_model=1",
        ),
        Peer(
            name="litserve",
            venv=PEERS_DIR / "litserve",
            port_names=("http",),
            command=litserve_command,
            ready=ok("http", "/health"),
            request=multipart_post("/predict"),
            answer=top5_json,
            env=servers_path,
            packages=("litserve",),
            setup=f"LitAPI max_batch_size={MAX_BATCH_SIZE}, batch_timeout={MAX_BATCH_DELAY_MS / 1000}; "
            "multipart POST /predict",
        ),
        Peer(
            name="mlserver",
            venv=PEERS_DIR / "mlserver",
            port_names=("http", "grpc", "metrics"),
            command=mlserver_command,
            ready=ok("http", f"/v2/models/{MODEL}/ready"),
            request=v2_infer,
            answer=v2_outputs,
            env=servers_path,
            packages=("mlserver", "uvloop"),
            setup=f"custom MLModel runtime, adaptive batching max_batch_size {MAX_BATCH_SIZE}, "
            f"max_batch_time {MAX_BATCH_DELAY_MS / 1000}; v2 JSON, base64 BYTES",
        ),
        Peer(
            name="fastapi",
            venv=PEERS_DIR / "fastapi",
            port_names=("http",),
            command=fastapi_command,
            ready=ok("http", "/health"),
            request=multipart_post("/classify"),
            answer=top5_json,
            env=lambda launch: {**servers_path(launch), "LEVIT_PEER_CHECKPOINT": str(launch.checkpoint)},
            packages=("fastapi", "uvicorn"),
            setup="uvicorn, 1 worker, def endpoint with UploadFile, one forward per request; multipart POST /classify",
        ),
    )
}
