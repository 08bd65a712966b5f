"""What every deployment check shares: paths, the tools, the server's contracts, a fake HTTP server."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = Path(os.environ.get("DEPLOY_TOOLS_DIR", ROOT / ".tools"))
INSTALLER = ROOT / "scripts" / "ci_deploy_tools.sh"
TOOL_NAMES = ("hadolint", "helm", "kubernetes-validate", "docker-compose", "promtool", "checkov")

DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_GPU = ROOT / "docker" / "compose.gpu.yaml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "levit-serve.json"
CHART = ROOT / "k8s" / "levit-serve"
ADAPTER_VALUES = ROOT / "k8s" / "prometheus-adapter" / "values.yaml"
VALUES_FILES = {"default": None} | {p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}
RELEASE, NAMESPACE = "rel", "levit"
FULLNAME = f"{RELEASE}-levit-serve"

# The writable /tmp that compose (a tmpfs) and the chart (a memory-backed emptyDir) give the server, in MiB.
# The container test runs the image with the same, so what fits there fits where it is deployed.
DEPLOYED_TMP_MIB = 64

# Kubernetes versions the rendered manifests must validate against: the chart's floor and the newest.
KUBE_VERSIONS = ("1.27.0", "1.37.0")


# --- the server's metric contract: read from service.metrics, never copied ----------------------------
def metric_contract() -> dict[str, tuple[str, frozenset[str]]]:
    """Every metric object of `service.metrics`: family name (as /metrics names it) -> (type, label names)."""
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics

    out: dict[str, tuple[str, frozenset[str]]] = {}
    for obj in vars(service.metrics).values():
        if isinstance(obj, MetricWrapperBase):
            [family] = obj.describe()
            out[family.name] = (family.type, frozenset(obj._labelnames))
    return out


METRICS = metric_contract()
# Labels Prometheus / prometheus-operator / prometheus-adapter attach to every scraped series.
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "service", "container", "endpoint", "node"})


def series_names() -> dict[str, tuple[str, str]]:
    """Every series name the server exposes -> (family, kind of series)."""
    out: dict[str, tuple[str, str]] = {}
    for name, (kind, _labels) in METRICS.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = (name, "bucket" if suffix == "_bucket" else "counter")
        elif kind == "counter":
            out[name + "_total"] = (name, "counter")
        else:
            out[name] = (name, kind)
    return out


SERIES = series_names()


# --- tools ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tools:
    bin: Path

    def __getattr__(self, name: str) -> str:
        return str(self.bin / name.replace("_", "-"))


def install_tools() -> Tools:
    proc = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{INSTALLER.name} failed:\n{proc.stdout}\n{proc.stderr}"
    bin_dir = TOOLS_DIR / "bin"
    for tool in TOOL_NAMES:
        assert os.access(bin_dir / tool, os.X_OK), f"{tool} missing from {bin_dir} after {INSTALLER.name}"
    return Tools(bin_dir)


def run(cmd: list[str], *, ok: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("cwd", ROOT)
    kw.setdefault("timeout", 240)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if ok:
        assert proc.returncode == 0, f"{shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def helm_args(values_name: str) -> list[str]:
    path = VALUES_FILES[values_name]
    return ["-f", str(path)] if path else []


# --- the settings contract ------------------------------------------------------------------------
def validate_settings(settings_cls, env: dict[str, str]):
    """Settings() as the server builds it from exactly this environment (other LEVIT_* removed)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("LEVIT_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update({k: str(v) for k, v in env.items()})
        return settings_cls()
    finally:
        for k in [k for k in os.environ if k.startswith("LEVIT_")]:
            del os.environ[k]
        os.environ.update(saved)


def levit_tokens(text: str) -> set[str]:
    return set(re.findall(r"\bLEVIT_[A-Z0-9_]*[A-Z0-9]\b", text))


# --- a fake server for healthcheck and helm-test scripts ------------------------------------------
class FakeServer:
    """Tiny HTTP server answering each path with a configurable status (for healthcheck commands)."""

    def __init__(self, routes: dict[str, tuple[int, bytes]]):
        self.routes = routes
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = outer.routes.get(self.path, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
