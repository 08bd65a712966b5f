"""Static validation of the deployment side: Dockerfiles, compose stack, Prometheus/Grafana, Helm chart.

Real tools do the checking (hadolint, helm, kubernetes-validate, docker-compose, promtool, checkov). They
live in .tools/ and are installed by scripts/ci_deploy_tools.sh, which the `tools` fixture runs first (a
no-op taking milliseconds when everything is there). Nothing is skipped: a missing tool is a failure.

The metric contract of the server is `METRICS` below; the dashboard, the prometheus-adapter rules and the
HPA may only use those names. The settings contract is `service.settings.Settings`: every LEVIT_* name
used in a Dockerfile, the compose file or the chart must be one of its fields, with a valid value.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
import typing
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = Path(os.environ.get("DEPLOY_TOOLS_DIR", ROOT / ".tools"))
INSTALLER = ROOT / "scripts" / "ci_deploy_tools.sh"

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

# Kubernetes versions the rendered manifests must validate against: the chart's floor and the newest.
KUBE_VERSIONS = ("1.27.0", "1.37.0")

# --- the server's metric contract -----------------------------------------------------------------
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "levit_request_duration_seconds": ("histogram", frozenset({"protocol", "route", "status"})),
    "levit_queue_wait_seconds": ("histogram", frozenset()),
    "levit_batch_size": ("histogram", frozenset()),
    "levit_model_forward_seconds": ("histogram", frozenset()),
    "levit_preprocess_seconds": ("histogram", frozenset()),
    "levit_queue_depth": ("gauge", frozenset()),
    "levit_inflight_requests": ("gauge", frozenset({"protocol"})),
    "levit_images_classified_total": ("counter", frozenset()),
    "levit_rejections_total": ("counter", frozenset({"reason"})),
    "levit_model_info": ("gauge", frozenset({"variant", "weights", "device", "dtype"})),
}
# Labels Prometheus / prometheus-operator / prometheus-adapter attach to every scraped series.
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "service", "container", "endpoint", "node"})


def series_names() -> dict[str, tuple[str, str]]:
    """Every series name the server exposes -> (family, kind of series)."""
    out: dict[str, tuple[str, str]] = {}
    for name, (kind, _labels) in METRICS.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = (name, "bucket" if suffix == "_bucket" else "counter")
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


@pytest.fixture(scope="session")
def tools() -> Tools:
    proc = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{INSTALLER.name} failed:\n{proc.stdout}\n{proc.stderr}"
    bin_dir = TOOLS_DIR / "bin"
    for tool in ("hadolint", "helm", "kubernetes-validate", "docker-compose", "promtool", "checkov"):
        assert os.access(bin_dir / tool, os.X_OK), f"{tool} missing from {bin_dir} after {INSTALLER.name}"
    return Tools(bin_dir)


def run(cmd: list[str], *, ok: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("cwd", ROOT)
    kw.setdefault("timeout", 240)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if ok:
        assert proc.returncode == 0, f"{shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- contracts read from the project --------------------------------------------------------------
@pytest.fixture(scope="session")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="session")
def settings_cls():
    from service.settings import Settings

    return Settings


@pytest.fixture(scope="session")
def env_names(settings_cls) -> set[str]:
    return {f"LEVIT_{name.upper()}" for name in settings_cls.model_fields}


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


# --- Dockerfile parsing ---------------------------------------------------------------------------
@dataclass
class Instr:
    kw: str
    args: str


def parse_dockerfile(path: Path) -> list[list[Instr]]:
    """Instructions grouped by stage (stage 0 = ARGs before the first FROM)."""
    stages: list[list[Instr]] = [[]]
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        kw, _, rest = buf.partition(" ")
        instr = Instr(kw.upper(), rest.strip())
        if instr.kw == "FROM":
            stages.append([])
        stages[-1].append(instr)
        buf = ""
    return stages


def arg_defaults(instrs: list[Instr]) -> dict[str, str]:
    out = {}
    for i in instrs:
        if i.kw == "ARG" and "=" in i.args:
            k, _, v = i.args.partition("=")
            out[k] = v
    return out


def env_of(stage: list[Instr]) -> dict[str, str]:
    args = arg_defaults(stage)
    env: dict[str, str] = {}
    for i in stage:
        if i.kw == "ENV":
            for tok in shlex.split(i.args):
                k, _, v = tok.partition("=")
                env[k] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), v)
    return env


def exec_form(stage: list[Instr], kw: str) -> list[str]:
    [instr] = [i for i in stage if i.kw == kw]
    return json.loads(instr.args)


def healthcheck_cmd(stage: list[Instr]) -> list[str]:
    [instr] = [i for i in stage if i.kw == "HEALTHCHECK"]
    return json.loads(instr.args.split(" CMD ", 1)[1])


@pytest.fixture(scope="session", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, Path, list[list[Instr]]]:
    path = DOCKERFILES[request.param]
    return request.param, path, parse_dockerfile(path)


def test_hadolint_clean(tools, dockerfile):
    _, path, _ = dockerfile
    proc = run([tools.hadolint, "--no-color", "--failure-threshold", "info", str(path)], ok=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint {path.name}:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_base_image_and_stages(dockerfile):
    flavor, path, stages = dockerfile
    base = arg_defaults(stages[0]).get("BASE_IMAGE")
    if flavor == "cpu":
        assert base == "python:3.11-slim", "the CPU default base must stay the public slim image"
    else:
        assert base and base.startswith("nvidia/cuda:") and "-runtime-" in base, base
    froms = [s[0].args for s in stages[1:]]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms), froms
    final = stages[-1]
    assert any(i.kw == "COPY" and "--from=builder" in i.args and "/opt/venv" in i.args for i in final)
    final_runs = " ".join(i.args for i in final if i.kw == "RUN")
    for tool in ("gcc", "g++", "build-essential", "make ", "python3-dev", "python3-venv", "git ", "pip install"):
        assert tool not in final_runs, f"{path.name}: final stage must not install {tool.strip()}"


def test_dockerfile_runs_as_non_root(dockerfile):
    _, path, stages = dockerfile
    users = [i.args for i in stages[-1] if i.kw == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric non-root UID (lets Kubernetes verify runAsNonRoot)"
    assert not gid or (gid.isdigit() and int(gid) > 0)


def test_dockerfile_entrypoint_is_tini_and_cmd_is_console_script(dockerfile, pyproject):
    _, _, stages = dockerfile
    final = stages[-1]
    entrypoint, cmd = exec_form(final, "ENTRYPOINT"), exec_form(final, "CMD")
    assert Path(entrypoint[0]).name == "tini" and entrypoint[-1] == "--", entrypoint
    assert any("install" in i.args and re.search(r"\btini\b", i.args) for i in final if i.kw == "RUN")
    scripts = pyproject["project"]["scripts"]
    assert cmd[0] in scripts, f"CMD {cmd} must start a [project.scripts] entry ({sorted(scripts)})"
    assert scripts[cmd[0]].startswith("service."), scripts[cmd[0]]
    stopsignal = [i.args for i in final if i.kw == "STOPSIGNAL"]
    assert stopsignal in ([], ["SIGTERM"])


def test_console_script_targets_exist(pyproject):
    """The scripts the images run (levit-serve, levit-weights) must point at real modules of the repo."""
    scripts = pyproject["project"]["scripts"]
    for name in ("levit-serve", "levit-weights"):
        module, _, func = scripts[name].partition(":")
        path = ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), f"{name} -> {module}"
        assert func


def test_dockerfile_weights_baked_where_the_server_looks(dockerfile, pyproject):
    flavor, path, stages = dockerfile
    builder = next(s for s in stages[1:] if s[0].args.endswith(" AS builder"))
    args = arg_defaults(builder)
    assert args["DOWNLOAD_WEIGHTS"] == "true"
    from model.configs import VARIANTS

    assert args["MODEL"] in VARIANTS
    assert "levit-weights" in pyproject["project"]["scripts"]
    runs = " ".join(i.args for i in builder if i.kw == "RUN")
    m = re.search(r'levit-weights download --model "\$\{MODEL\}" --cache-dir (\S+)', runs)
    assert m, f"{path.name}: builder must run `levit-weights download --model ${{MODEL}} --cache-dir DIR`"
    weights_dir = m.group(1)
    env = env_of(stages[-1])
    assert env["LEVIT_CACHE_DIR"] == weights_dir
    assert env["LEVIT_WEIGHTS"] == "auto"
    assert env["LEVIT_MODEL"] == args["MODEL"], "served variant = baked variant"
    assert any(i.kw == "COPY" and i.args.split()[-2:] == [weights_dir, weights_dir] for i in stages[-1])
    assert env["LEVIT_DEVICE"] == ("cpu" if flavor == "cpu" else "cuda")


def test_dockerfile_torch_matches_pyproject_pin(dockerfile, pyproject):
    flavor, path, stages = dockerfile
    pin = next(d for d in pyproject["project"]["dependencies"] if re.match(r"torch\s*==", d))
    version = pin.split("==", 1)[1].strip()
    builder = next(s for s in stages[1:] if s[0].args.endswith(" AS builder"))
    args = arg_defaults(builder)
    assert args["TORCH_VERSION"] == version, f"{path.name} TORCH_VERSION vs pyproject {pin}"
    runs = " ".join(i.args for i in builder if i.kw == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs
    if flavor == "cpu":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert '--index-url "${TORCH_INDEX_URL}"' in runs
    else:
        assert "download.pytorch.org" not in path.read_text(), "GPU image uses PyPI's default CUDA wheels"


def test_dockerfile_ports_and_healthcheck(dockerfile):
    _, path, stages = dockerfile
    final = stages[-1]
    env = env_of(final)
    exposed = {p for i in final if i.kw == "EXPOSE" for p in i.args.split()}
    assert exposed == {env["LEVIT_HTTP_PORT"], env["LEVIT_GRPC_PORT"]} == {"8000", "50051"}
    cmd = healthcheck_cmd(final)
    assert cmd[0] == "python" and "/healthz" in cmd[-1] and "urllib" in cmd[-1]
    assert "curl" not in path.read_text().split("HEALTHCHECK", 1)[1]


def test_dockerfile_env_is_valid_settings(dockerfile, settings_cls, env_names):
    _, path, stages = dockerfile
    unknown = levit_tokens(path.read_text()) - env_names
    assert not unknown, f"{path.name} uses LEVIT_* names that are not Settings fields: {sorted(unknown)}"
    env = {k: v for k, v in env_of(stages[-1]).items() if k.startswith("LEVIT_")}
    settings = validate_settings(settings_cls, env)
    assert settings.require_pretrained is True, "an image with baked weights must refuse random weights"
    assert settings.log_format == "json"
    assert settings.drain_timeout_s > 0


class _FakeServer:
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


def _run_check(cmd: list[str], env: dict[str, str]) -> int:
    argv = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
    return subprocess.run(argv, env=os.environ | env, capture_output=True, timeout=30, check=False).returncode


def test_healthcheck_commands_really_probe():
    """Run the image's and compose's healthcheck commands against a fake server: 200 -> 0, 503 -> != 0."""
    server = _FakeServer({"/healthz": (200, b"ok"), "/readyz": (200, b"ok")})
    try:
        compose_test = yaml.safe_load(COMPOSE.read_text())["services"]["levit-serve"]["healthcheck"]["test"]
        assert compose_test[0] == "CMD"
        compose_cmd = [a.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}") for a in compose_test[1:]]
        for path in DOCKERFILES.values():
            cmd = healthcheck_cmd(parse_dockerfile(path)[-1])
            assert _run_check(cmd, {"LEVIT_HTTP_PORT": str(server.port)}) == 0
        assert _run_check(compose_cmd, {}) == 0
        server.routes = {"/healthz": (503, b"no"), "/readyz": (503, b"draining")}
        for path in DOCKERFILES.values():
            cmd = healthcheck_cmd(parse_dockerfile(path)[-1])
            assert _run_check(cmd, {"LEVIT_HTTP_PORT": str(server.port)}) != 0
        assert _run_check(compose_cmd, {}) != 0
    finally:
        server.close()


# --- .dockerignore --------------------------------------------------------------------------------
def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match + `**`) as a regex over slash-separated paths."""
    pattern = os.path.normpath(pattern.lstrip("/"))
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1].replace("[!", "[^"), j + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_included(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            included = negate
    return included


def test_dockerignore_keeps_context_small_and_complete():
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _docker_pattern(line[1:] if negate else line)))
    sent, size = [], 0
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        # Prune what is excluded wholesale (.git, .venv, .tools): a re-include below them is impossible here.
        dirnames[:] = [d for d in dirnames if rel_dir != "." or d not in {".git", ".venv", ".tools"}]
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if dockerignore_included(rel, rules):
                sent.append(rel)
                size += os.path.getsize(os.path.join(dirpath, f))
    for must in ("pyproject.toml", "model/configs.py", "model/imagenet1k_classes.tsv", "service/settings.py"):
        assert must in sent, f"{must} must be in the build context"
    if (ROOT / "README.md").exists():
        assert "README.md" in sent, "pyproject's readme must be in the build context"
    for path in ROOT.glob("*/**/*.py"):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(("model/", "service/")) and "__pycache__" not in rel:
            assert rel in sent, f"{rel} missing from the build context"
    for rel in sent:
        assert not rel.startswith((".git/", ".venv/", ".tools/", "tests/", "k8s/", "docs/", "bench/", ".ci/"))
        assert not rel.endswith((".pth", ".pt", ".safetensors", ".pyc")) and "__pycache__" not in rel
    assert size < 5 * 1024 * 1024, f"build context is {size / 1e6:.1f} MB"
    for path in (".venv/bin/python", ".git/HEAD", ".tools/bin/helm", "LeViT-128S-96703c44.pth", "x/y/z.pth"):
        assert not dockerignore_included(path, rules), path


# --- compose --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def compose_config(tools) -> dict:
    run([tools.docker_compose, "-f", str(COMPOSE), "config", "--quiet"])
    proc = run([tools.docker_compose, "-f", str(COMPOSE), "config", "--format", "json"])
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def compose_gpu_config(tools) -> dict:
    files = ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]
    run([tools.docker_compose, *files, "config", "--quiet"])
    return json.loads(run([tools.docker_compose, *files, "config", "--format", "json"]).stdout)


def _seconds(duration: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_compose_services_are_hardened(compose_config):
    services = compose_config["services"]
    assert {"levit-serve", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert svc.get("read_only") is True, f"{name}: read_only root fs"
        user = str(svc.get("user", ""))
        assert user and user.split(":")[0] not in ("0", "root"), f"{name}: non-root user"
        assert "ALL" in svc.get("cap_drop", []), f"{name}: cap_drop ALL"
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert svc.get("healthcheck", {}).get("test"), f"{name}: healthcheck"
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("cpus") and limits.get("memory"), f"{name}: cpu and memory limits"
        for port in svc.get("ports", []):
            if name != "levit-serve":
                assert port.get("host_ip") == "127.0.0.1", f"{name}: monitoring UIs only on loopback"


def test_compose_levit_service(compose_config, settings_cls, env_names):
    svc = compose_config["services"]["levit-serve"]
    assert Path(svc["build"]["context"]).resolve() == ROOT
    assert Path(svc["build"]["dockerfile"]).name == "Dockerfile"
    assert any(t.split(":")[0] == "/tmp" for t in svc.get("tmpfs", [])), "writable /tmp under read_only"
    env = svc["environment"]
    assert set(env) <= env_names, f"unknown LEVIT_* in compose: {sorted(set(env) - env_names)}"
    assert not levit_tokens(COMPOSE.read_text()) - env_names
    image_env = {k: v for k, v in env_of(parse_dockerfile(DOCKERFILES["cpu"])[-1]).items() if k.startswith("LEVIT_")}
    settings = validate_settings(settings_cls, image_env | env)
    assert settings.model == svc["build"]["args"]["MODEL"], "served variant = baked variant"
    assert _seconds(svc["stop_grace_period"]) > settings.drain_timeout_s, "stop_grace_period > drain timeout"
    assert 0 < settings.threads <= float(svc["deploy"]["resources"]["limits"]["cpus"])
    published = {(int(p["target"]), str(p["published"])) for p in svc["ports"]}
    assert published == {(settings.http_port, str(settings.http_port)), (settings.grpc_port, str(settings.grpc_port))}


def test_compose_gpu_override(compose_gpu_config, settings_cls, env_names):
    svc = compose_gpu_config["services"]["levit-serve"]
    assert Path(svc["build"]["dockerfile"]).name == "Dockerfile.gpu"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert not levit_tokens(COMPOSE_GPU.read_text()) - env_names
    image_env = {k: v for k, v in env_of(parse_dockerfile(DOCKERFILES["gpu"])[-1]).items() if k.startswith("LEVIT_")}
    settings = validate_settings(settings_cls, image_env | svc["environment"])
    assert settings.device == "cuda"


def test_prometheus_config_promtool(tools):
    out = run([tools.promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert "SUCCESS" in out.stdout + out.stderr


def test_prometheus_scrapes_the_service(compose_config):
    services = compose_config["services"]
    prom = services["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    mounts = {Path(v["source"]).resolve(): v["target"] for v in prom["volumes"] if v["type"] == "bind"}
    assert mounts[PROMETHEUS_CONFIG.resolve()] == config_file
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "levit-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [target] = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.rsplit(":", 1)
    assert host == "levit-serve" and host in services
    assert port == services[host]["environment"].get("LEVIT_HTTP_PORT", "8000")


def test_grafana_provisioning_matches_compose(compose_config):
    graf = compose_config["services"]["grafana"]
    mounts = {Path(v["source"]).resolve(): v["target"] for v in graf["volumes"] if v["type"] == "bind"}
    assert mounts[(GRAFANA_DIR / "provisioning").resolve()] == "/etc/grafana/provisioning"
    dash_target = mounts[(GRAFANA_DIR / "dashboards").resolve()]
    [provider] = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/levit-serve.yaml").read_text())["providers"]
    assert provider["options"]["path"] == dash_target
    [ds] = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose_config["services"]
    dash = json.loads(DASHBOARD.read_text())
    [var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus" and var["current"]["value"] == ds["uid"]
    home = graf["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == f"{dash_target}/{DASHBOARD.name}"


# --- PromQL: a small lexer that finds metric names, function nesting and label names --------------
AGGREGATIONS = set(
    re.findall(
        r"\w+", "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio"
    )
)
FUNCTIONS = AGGREGATIONS | set(
    re.findall(
        r"\w+",
        """abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month day_of_week day_of_year
    days_in_month delta deriv exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum hour idelta increase irate label_join label_replace ln log10 log2
    minute month predict_linear rate resets round scalar sgn sort sort_desc sqrt time timestamp vector year
    avg_over_time min_over_time max_over_time sum_over_time count_over_time quantile_over_time stddev_over_time
    stdvar_over_time last_over_time present_over_time""",
    )
)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"bool", "offset", "and", "or", "unless", "atan2", "inf", "nan"}
RATE_FUNCS = {"rate", "irate", "increase", "resets"}

_TOKEN = re.compile(
    r"""\s+|(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)|(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-z]*)"""
    r"""|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<brace>\{)|(?P<bracket>\[[^\]]*\])|(?P<op>[()\],+\-*/%^<>=!~@]+)"""
)


@dataclass
class PromUse:
    metrics: list[tuple[str, tuple[str, ...]]]  # (series name, enclosing functions outermost first)
    labels: set[str]


def promql_uses(expr: str) -> PromUse:
    metrics: list[tuple[str, tuple[str, ...]]] = []
    labels: set[str] = set()
    stack: list[str] = []  # function per open paren ("" for plain grouping parens)
    pos, pending_fn, grouping = 0, None, False
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m, f"cannot lex {expr[pos:]!r} in {expr!r}"
        pos = m.end()
        if m.group("brace"):
            end = expr.index("}", pos)
            body = expr[pos:end]
            for name, _op, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(\"[^\"]*\"|'[^']*')", body):
                if name == "__name__":
                    metrics.append((value[1:-1], tuple(stack)))
                else:
                    labels.add(name)
            pos = end + 1
            continue
        tok = m.group("id")
        if tok:
            nxt = expr[pos:].lstrip()[:1]
            if tok in GROUPING:
                grouping = True
            elif tok in FUNCTIONS:  # `sum(`, but also `sum by (le) (`
                pending_fn = tok
            elif nxt == "(":
                raise AssertionError(f"unknown PromQL function {tok!r} in {expr!r}")
            elif tok not in KEYWORDS:
                metrics.append((tok, tuple(stack)))
            continue
        op = m.group("op") or ""
        for ch in op:
            if ch == "(":
                if grouping:  # a label list: by (a, b)
                    end = expr.index(")", pos)
                    labels.update(x.strip() for x in expr[pos:end].split(",") if x.strip())
                    pos, grouping = end + 1, False
                    break
                stack.append(pending_fn or "")
                pending_fn = None
            elif ch == ")":
                assert stack, f"unbalanced ) in {expr!r}"
                stack.pop()
    assert not stack, f"unbalanced ( in {expr!r}"
    return PromUse(metrics, labels)


def check_promql(expr: str, where: str, *, selector_only: bool = False) -> list[str]:
    """Problems with one expression: unknown series, counters without rate(), gauges under rate(), labels."""
    errors = []
    use = promql_uses(expr)
    assert use.metrics, f"{where}: no metric in {expr!r}"
    allowed_labels = set(TARGET_LABELS)
    for name, funcs in use.metrics:
        if name not in SERIES:
            errors.append(f"{where}: {name!r} is not a series of the server's metrics (METRICS)")
            continue
        family, kind = SERIES[name]
        allowed_labels |= METRICS[family][1]
        if kind == "bucket":
            allowed_labels.add("le")
        if selector_only:
            continue
        under_rate = any(f in RATE_FUNCS for f in funcs)
        if kind in ("counter", "bucket") and not under_rate:
            errors.append(f"{where}: {name} is a counter; use rate()/increase() in {expr!r}")
        if kind == "gauge" and funcs and funcs[-1] in RATE_FUNCS:
            errors.append(f"{where}: {name} is a gauge; rate()/increase() is meaningless in {expr!r}")
        if kind == "bucket" and "histogram_quantile" in funcs and "le" not in use.labels:
            errors.append(f"{where}: histogram_quantile over {name} must keep `le` in {expr!r}")
    unknown = use.labels - allowed_labels
    if unknown:
        errors.append(f"{where}: labels {sorted(unknown)} not on these metrics in {expr!r}")
    return errors


GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return out


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_exprs() -> list[tuple[str, str, bool]]:
    out = []
    for rule in adapter_rules():
        series = promql_uses(rule["seriesQuery"]).metrics[0][0]
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="levit",pod=~"levit-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        out.append((f"adapter rule {rule['name']['as']} seriesQuery", rule["seriesQuery"], True))
        out.append((f"adapter rule {rule['name']['as']} metricsQuery", query, False))
    return out


def substitute_grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "levit-serve" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            metric = re.match(r"label_values\((\w+)", var["definition"]).group(1)
            assert metric in SERIES, var


def test_dashboard_covers_the_required_views():
    exprs = [e for _, e in dashboard_exprs()]
    text = "\n".join(exprs)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"rate\(levit_request_duration_seconds_count"), "request rate"
    request_buckets = r"sum by \(protocol, le\) \(rate\(levit_request_duration_seconds_bucket"
    for q in ("0.5", "0.95", "0.99"):
        assert has(rf"histogram_quantile\({q}, {request_buckets}"), f"p{q} latency by protocol"
    assert "levit_queue_depth" in text, "queue depth"
    assert has(r"sum by \(le\) \(increase\(levit_batch_size_bucket"), "batch-size distribution"
    assert has(r"histogram_quantile\(0.95, .*levit_model_forward_seconds_bucket"), "model forward time"
    assert has(r"sum by \(reason\) \(rate\(levit_rejections_total"), "rejections by reason"
    heatmaps = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "heatmap"]
    targets = [t for p in heatmaps for t in p["targets"]]
    assert any("levit_batch_size_bucket" in t["expr"] and t.get("format") == "heatmap" for t in targets)


def test_promql_uses_only_contract_metrics():
    errors = []
    for where, expr in dashboard_exprs():
        errors += check_promql(substitute_grafana(expr), where)
    for where, expr, selector_only in adapter_exprs():
        errors += check_promql(expr, where, selector_only=selector_only)
    assert not errors, "\n".join(errors)


def test_promql_checker_catches_mistakes():
    """The checker above is only worth something if it fails on the usual slips."""
    assert check_promql("rate(levit_requests_total[1m])", "t")  # unknown name
    assert check_promql("sum(levit_rejections_total)", "t")  # counter without rate
    assert check_promql("rate(levit_queue_depth[1m])", "t")  # gauge under rate
    assert check_promql("histogram_quantile(0.9, sum by (protocol) (rate(levit_batch_size_bucket[1m])))", "t")
    assert check_promql("sum by (reason) (levit_inflight_requests)", "t")  # label of another metric
    assert not check_promql('sum by (protocol) (levit_inflight_requests{instance=~".*"})', "t")
    with pytest.raises(AssertionError):
        promql_uses("sum(rates(levit_batch_size_count[1m]))")


def test_promql_syntax_with_promtool(tools, tmp_path):
    exprs = [(w, substitute_grafana(e)) for w, e in dashboard_exprs()]
    exprs += [(w, e) for w, e, _ in adapter_exprs()]
    rules = {
        "groups": [
            {
                "name": "syntax",
                "rules": [{"record": f"levit:syntax_check_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    run([tools.promtool, "check", "rules", str(path)])


# --- Helm chart -----------------------------------------------------------------------------------
def helm_args(values_name: str) -> list[str]:
    path = VALUES_FILES[values_name]
    return ["-f", str(path)] if path else []


@pytest.fixture(scope="session")
def rendered(tools) -> dict[str, list[dict]]:
    out = {}
    for name in VALUES_FILES:
        proc = run([tools.helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *helm_args(name)])
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


@pytest.fixture(scope="session")
def rendered_text(tools, rendered, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rendered")
    out = {}
    for name in VALUES_FILES:
        path = d / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(rendered[name], sort_keys=False))
        out[name] = path
    return out


def one(docs: list[dict], kind: str, name: str = FULLNAME) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", d["spec"]))
    return out


def chart_values(name: str) -> dict:
    """Default values deep-merged with the values file (as helm does for these simple overlays)."""

    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: merge(a.get(k), b[k]) if k in b else a[k] for k in a | b}
        return b

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if VALUES_FILES[name]:
        values = merge(values, yaml.safe_load(VALUES_FILES[name].read_text()))
    return values


@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_helm_lint(tools, values_name):
    proc = run([tools.helm, "lint", "--strict", str(CHART), "-n", NAMESPACE, *helm_args(values_name)], ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[ERROR]" not in out and "[WARNING]" not in out and "funcMap fail" not in out, out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_rendered_manifests_match_kubernetes_schemas(tools, rendered, rendered_text, values_name, kube_version):
    proc = run([tools.kubernetes_validate, "--strict", "-k", kube_version, str(rendered_text[values_name])], ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    builtin = [
        d
        for d in rendered[values_name]
        if "/" not in d["apiVersion"]
        or ".k8s.io/" in d["apiVersion"]
        or d["apiVersion"].split("/")[0] in ("apps", "policy", "autoscaling", "batch")
    ]
    assert out.count(" passed for resource ") == len(builtin), out
    for line in out.splitlines():
        if line.startswith(("WARN", "ERROR")):
            assert "kind ServiceMonitor" in line, line  # CRD: checked by test_service_monitor instead


def test_kubernetes_validate_catches_errors(tools, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "x"},
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {
                        "metadata": {"labels": {"a": "b"}},
                        "spec": {"containers": [{"name": "c", "image": "i", "readinessProbes": {}}]},
                    },
                },
            }
        )
    )
    assert run([tools.kubernetes_validate, "--strict", str(bad)], ok=False).returncode != 0


@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_pods_are_locked_down(rendered, values_name):
    specs = pod_specs(rendered[values_name])
    assert any(name.startswith("Deployment/") for name, _ in specs)
    for name, spec in specs:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: no service account token"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, f"{where}: runAsUser 0"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert not sc.get("privileged"), f"{where}: privileged"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities drop ALL"
            assert not sc.get("capabilities", {}).get("add"), f"{where}: capabilities add"
            assert sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") == "RuntimeDefault"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: writable /tmp under the read-only root"
            res = c.get("resources", {})
            assert res.get("limits", {}).get("memory") and res.get("requests", {}).get("cpu"), f"{where}: resources"


@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_configmap_is_valid_settings(rendered, values_name, settings_cls, env_names):
    docs = rendered[values_name]
    data = one(docs, "ConfigMap")["data"]
    assert set(data) <= env_names, f"not Settings fields: {sorted(set(data) - env_names)}"
    values = chart_values(values_name)
    flavor = "gpu" if values["gpu"]["enabled"] else "cpu"
    image_env = {k: v for k, v in env_of(parse_dockerfile(DOCKERFILES[flavor])[-1]).items() if k.startswith("LEVIT_")}
    settings = validate_settings(settings_cls, image_env | data)  # envFrom overrides the image ENV
    deploy = one(docs, "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    [server] = [c for c in spec["containers"] if c["name"] == "levit-serve"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}
    assert {"configMapRef": {"name": FULLNAME}} in server["envFrom"]
    assert all(not e["name"].startswith("LEVIT_") for e in server.get("env", []))
    assert settings.device == ("cuda" if flavor == "gpu" else "cpu")
    if settings.threads:
        cpu = str(server["resources"]["limits"]["cpu"])
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        assert settings.threads <= max(1, round(cores)), "LEVIT_THREADS above the CPU limit oversubscribes"
    # The pod restarts when the config changes.
    assert re.fullmatch(r"[0-9a-f]{64}", deploy["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_probes_ports_and_graceful_shutdown(rendered, values_name):
    docs = rendered[values_name]
    data = one(docs, "ConfigMap")["data"]
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    [server] = [c for c in spec["containers"] if c["name"] == "levit-serve"]
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    ready = server["readinessProbe"]
    if "grpc" in ready:
        assert ready["grpc"]["port"] == int(data["LEVIT_GRPC_PORT"])
        assert ready["grpc"].get("service", "") in ("", "levit.v1.Classifier")
    else:
        assert ready["httpGet"] == {"path": "/readyz", "port": "http"}
    if "startupProbe" in server:
        assert server["startupProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = 0.0
    if "lifecycle" in server:
        cmd = server["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[0] == "sleep"
        pre_stop = float(cmd[1])
    drain = float(data["LEVIT_DRAIN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain, "grace period must cover preStop + drain"
    svc = one(docs, "Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    assert ports["grpc"]["targetPort"] == "grpc" and ports["grpc"]["appProtocol"] in ("kubernetes.io/h2c", "grpc")
    assert ports["http"]["targetPort"] == "http"
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_weights_source(rendered, values_name, settings_cls):
    docs = rendered[values_name]
    values = chart_values(values_name)
    source = values["weights"]["source"]
    data = one(docs, "ConfigMap")["data"]
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    inits = spec.get("initContainers", [])
    volumes = {v["name"]: v for v in spec["volumes"]}
    if source == "image":
        flavor = "gpu" if values["gpu"]["enabled"] else "cpu"
        image_env = env_of(parse_dockerfile(DOCKERFILES[flavor])[-1])
        assert data["LEVIT_CACHE_DIR"] == image_env["LEVIT_CACHE_DIR"], "cache dir = weights baked in the image"
        assert not inits and "weights" not in volumes
        return
    assert data["LEVIT_CACHE_DIR"] == values["weights"]["mountPath"]
    if source == "initContainer" or values["weights"]["pvc"]["download"]:
        [init] = inits
        assert init["command"] == [
            "levit-weights",
            "download",
            "--model",
            data["LEVIT_MODEL"],
            "--cache-dir",
            data["LEVIT_CACHE_DIR"],
        ]
        assert {"name": "weights", "mountPath": data["LEVIT_CACHE_DIR"]} in init["volumeMounts"]
    if source == "initContainer":
        assert "emptyDir" in volumes["weights"]
    else:
        claim = volumes["weights"]["persistentVolumeClaim"]["claimName"]
        if not values["weights"]["pvc"]["existingClaim"]:
            pvc = one(docs, "PersistentVolumeClaim", claim)
            assert pvc["spec"]["resources"]["requests"]["storage"]


def test_gpu_and_autoscaling_values(rendered):
    docs = rendered["gpu-values"]
    deploy = one(docs, "Deployment")
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    spec = deploy["spec"]["template"]["spec"]
    [server] = [c for c in spec["containers"] if c["name"] == "levit-serve"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert server["image"].endswith("-gpu")
    assert spec["nodeSelector"].get("nvidia.com/gpu.present") == "true"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert one(docs, "ConfigMap")["data"]["LEVIT_DEVICE"] == "cuda"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert "Pods" in kinds and "Resource" in kinds, "custom per-pod metric + CPU fallback"
    cpu = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Resource")
    assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["type"] == "Utilization"
    assert server["resources"]["requests"]["cpu"], "CPU utilization needs CPU requests"
    assert one(docs, "ServiceMonitor")


@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_hpa_metrics_are_served_by_the_adapter(tools, values_name):
    """Every Pods metric of the HPA is a name the shipped prometheus-adapter rules expose."""
    proc = run(
        [
            tools.helm,
            "template",
            RELEASE,
            str(CHART),
            "-n",
            NAMESPACE,
            *helm_args(values_name),
            "--set",
            "autoscaling.enabled=true",
            "--show-only",
            "templates/hpa.yaml",
        ]
    )
    hpa = yaml.safe_load(proc.stdout)
    exposed = {}
    for rule in adapter_rules():
        series = promql_uses(rule["seriesQuery"]).metrics[0][0]
        assert re.search(rule["name"]["matches"], series), rule
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        exposed[rule["name"]["as"]] = series
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            name = metric["pods"]["metric"]["name"]
            assert name in exposed, f"HPA metric {name} is not exposed by {ADAPTER_VALUES.relative_to(ROOT)}"
            assert metric["pods"]["target"]["type"] == "AverageValue"


def test_service_monitor(rendered):
    docs = rendered["gpu-values"]
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    headless = one(docs, "Service", f"{FULLNAME}-headless")
    assert not sm["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items(), (
        "the headless Service must not be scraped a second time"
    )
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


# Settings the chart sets itself (from ports / weights / lifecycle values); rejected under `config`.
CHART_MANAGED = ("LEVIT_HTTP_PORT", "LEVIT_GRPC_PORT", "LEVIT_CACHE_DIR", "LEVIT_DRAIN_TIMEOUT_S")
# Constraints that live in validators rather than in field metadata.
SCHEMA_EXTRAS = {
    "LEVIT_DEVICE": {"pattern": r"^(auto|cpu|cuda(:[0-9]+)?)$"},
    "LEVIT_WEIGHTS": {"minLength": 1},
    "LEVIT_HOST": {"minLength": 1},
}


def config_schema(settings_cls) -> dict:
    """The `config` section of values.schema.json, derived from service.settings.Settings."""
    import annotated_types
    from pydantic import ValidationError

    from model.configs import VARIANTS

    bounds = {
        annotated_types.Ge: ("minimum", "ge"),
        annotated_types.Le: ("maximum", "le"),
        annotated_types.Gt: ("exclusiveMinimum", "gt"),
        annotated_types.Lt: ("exclusiveMaximum", "lt"),
    }
    props = {}
    for name, field in settings_cls.model_fields.items():
        env = f"LEVIT_{name.upper()}"
        if env in CHART_MANAGED:
            continue
        prop: dict = {"description": field.description or name.replace("_", " ")}
        annotation = field.annotation
        if typing.get_origin(annotation) is typing.Literal or env == "LEVIT_MODEL":
            values = list(VARIANTS) if env == "LEVIT_MODEL" else list(typing.get_args(annotation))
            for value in list(values):  # spellings a `mode="before"` validator normalises (log level case)
                try:
                    if value.lower() != value and settings_cls(**{name: value.lower()}):
                        values.append(value.lower())
                except ValidationError:
                    pass
            prop |= {"type": ["string", "null"], "enum": [*values, None]}
        else:
            kind = {bool: "boolean", int: "integer", float: "number"}.get(annotation, "string")
            prop["type"] = [kind, "null"]  # null: leave it out of the ConfigMap (server default)
        for meta in field.metadata:
            if type(meta) in bounds:
                key, attr = bounds[type(meta)]
                prop[key] = getattr(meta, attr)
        props[env] = prop | SCHEMA_EXTRAS.get(env, {})
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "LEVIT_* server settings (service.settings.Settings); null = server default. "
        + ", ".join(CHART_MANAGED)
        + " are set by the chart and rejected here.",
        "required": ["LEVIT_MODEL"],
        "properties": props,
    }


def sync_schema() -> None:
    """Rewrite the config section of values.schema.json from Settings: python -m tests.test_deploy_static"""
    from service.settings import Settings

    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    schema["properties"]["config"] = config_schema(Settings)
    path.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def test_values_schema_mirrors_settings(settings_cls):
    """values.schema.json accepts exactly the Settings fields the chart does not manage, with their limits."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    expected = config_schema(settings_cls)
    actual = schema["properties"]["config"]
    assert actual == expected, (
        "values.schema.json `config` is out of date with service.settings.Settings; "
        "regenerate it with `.venv/bin/python -m tests.test_deploy_static`"
    )
    assert set(expected["properties"]) | set(CHART_MANAGED) == {f"LEVIT_{n.upper()}" for n in settings_cls.model_fields}


def test_chart_levit_names_are_settings_fields(env_names):
    files = [CHART / "values.yaml", *CHART.glob("templates/**/*"), *CHART.glob("ci/*.yaml"), ADAPTER_VALUES]
    for path in files:
        if path.is_file():
            unknown = levit_tokens(path.read_text()) - env_names
            assert not unknown, f"{path.relative_to(ROOT)}: {sorted(unknown)} are not Settings fields"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["config"]) <= env_names


def test_chart_defaults_agree_with_the_image():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    stages = parse_dockerfile(DOCKERFILES["cpu"])
    env = env_of(stages[-1])
    assert values["weights"]["imageDir"] == env["LEVIT_CACHE_DIR"]
    assert values["config"]["LEVIT_MODEL"] == env["LEVIT_MODEL"]
    assert str(values["ports"]["http"]) == env["LEVIT_HTTP_PORT"]
    assert str(values["ports"]["grpc"]) == env["LEVIT_GRPC_PORT"]
    uid, _, gid = [i.args for i in stages[-1] if i.kw == "USER"][-1].partition(":")
    assert values["securityContext"]["runAsUser"] == values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["fsGroup"] == int(gid)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["appVersion"]


BAD_VALUES = [
    ("config.LEVIT_MODEL=LeViT_999", "LEVIT_MODEL"),
    ("config.LEVIT_MAX_BATCH_SIZE=1000", "LEVIT_MAX_BATCH_SIZE"),
    ("config.LEVIT_DEVICE=tpu", "LEVIT_DEVICE"),
    ("config.LEVIT_MAXBATCH=4", "LEVIT_MAXBATCH"),
    ("config.LEVIT_HTTP_PORT=9000", "LEVIT_HTTP_PORT"),
    ("config.LEVIT_THREADS=-1", "LEVIT_THREADS"),
    ("config.LEVIT_LOG_FORMAT=xml", "LEVIT_LOG_FORMAT"),
    ("weights.source=s3", "weights/source"),
    ("replicaCount=two", "replicaCount"),
    ("gpu.enabled=yes", "gpu/enabled"),
    ("imageTypo.tag=x", "imageTypo"),
    ("extraEnv[0].name=LEVIT_MODEL", "extraEnv/0/name"),
    ("autoscaling.podMetrics[0].name=cpu_seconds", "podMetrics/0/name"),
    ("probes.readiness.type=tcp", "readiness/type"),
    ("lifecycle.terminationGracePeriodSeconds=20", "terminationGracePeriodSeconds"),
    ("config.LEVIT_DEVICE=cuda", "gpu.enabled"),
    ("config.LEVIT_DTYPE=float16", "GPU-only"),
]


@pytest.mark.parametrize(("setting", "message"), BAD_VALUES, ids=[s for s, _ in BAD_VALUES])
def test_wrong_values_fail_at_install(tools, setting, message):
    proc = run([tools.helm, "template", RELEASE, str(CHART), "--set", setting], ok=False)
    assert proc.returncode != 0, f"--set {setting} rendered fine"
    assert message in proc.stderr, proc.stderr


def test_int_values_are_not_rendered_in_e_notation(tools, tmp_path):
    """Helm reads numbers in values files as float64; 20971520 must not become "2.097152e+07"."""
    values = tmp_path / "values.yaml"
    values.write_text("config:\n  LEVIT_MAX_UPLOAD_BYTES: 20971520\n  LEVIT_MAX_BATCH_DELAY_MS: 2.5\n")
    cmd = [tools.helm, "template", RELEASE, str(CHART), "--show-only", "templates/configmap.yaml", "-f", str(values)]
    data = yaml.safe_load(run([*cmd, "--set", "config.LEVIT_MAX_IMAGE_PIXELS=50000000"]).stdout)["data"]
    assert data["LEVIT_MAX_UPLOAD_BYTES"] == "20971520" and data["LEVIT_MAX_IMAGE_PIXELS"] == "50000000"
    assert data["LEVIT_MAX_BATCH_DELAY_MS"] == "2.5"


def test_helm_test_pod_script_works(rendered):
    """Run the `helm test` pod's script against local fakes of the HTTP and gRPC endpoints."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    pod = one(rendered["default"], "Pod", f"{FULLNAME}-test-connection")
    script = pod["spec"]["containers"][0]["command"][2]
    http = _FakeServer({"/readyz": (200, b"ok"), "/v1/model": (200, b'{"variant": "LeViT_128S"}')})
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    for name in ("", "levit.v1.Classifier"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    gport = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        script = script.replace(f"{FULLNAME}:8000", f"127.0.0.1:{http.port}")
        script = script.replace(f"{FULLNAME}:50051", f"127.0.0.1:{gport}")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
        servicer.set("levit.v1.Classifier", health_pb2.HealthCheckResponse.NOT_SERVING)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode != 0
    finally:
        server.stop(None)
        http.close()


# --- checkov (security scan of rendered manifests + Dockerfiles) ----------------------------------
# Skipped for a reason: CKV_K8S_43 (image by digest) - supported via image.digest, tags are release-
# immutable by default; CKV_K8S_15 (pullPolicy Always) - pointless with immutable tags/digests.
CHECKOV_SKIPS = "CKV_K8S_43,CKV_K8S_15"


def _checkov(tools, args: list[str]) -> list[dict]:
    env = os.environ | {"PATH": f"{tools.bin}{os.pathsep}{os.environ['PATH']}", "ANSI_COLORS_DISABLED": "1"}
    proc = run([tools.checkov, "--quiet", "--compact", "--skip-download", "-o", "json", *args], ok=False, env=env)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"checkov printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from None
    return report if isinstance(report, list) else [report]


def test_checkov_rendered_manifests(tools, rendered_text):
    d = next(iter(rendered_text.values())).parent
    reports = _checkov(tools, ["-d", str(d), "--framework", "kubernetes", "--skip-check", CHECKOV_SKIPS])
    [report] = reports
    assert report["summary"]["resource_count"] >= 4 * len(rendered_text), report["summary"]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in report["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)


def test_checkov_dockerfiles(tools):
    args = []
    for path in DOCKERFILES.values():
        args += ["-f", str(path)]
    [report] = _checkov(tools, [*args, "--framework", "dockerfile"])
    assert report["summary"]["passed"] > 0, report["summary"]
    failed = [f"{c['check_id']} {c['check_name']}: {c['file_path']}" for c in report["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)


if __name__ == "__main__":
    sync_schema()
