"""The compose stack: docker-compose config, hardening, the server's settings, Prometheus and Grafana wiring."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.deploy.dockerfile import image_levit_env
from tests.deploy.support import (
    COMPOSE,
    COMPOSE_GPU,
    DASHBOARD,
    DEPLOYED_TMP_MIB,
    DOCKERFILES,
    GRAFANA_DIR,
    PROMETHEUS_CONFIG,
    ROOT,
    levit_tokens,
    run,
    validate_settings,
)


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
    [tmp] = [t for t in svc.get("tmpfs", []) if t.split(":")[0] == "/tmp"]  # writable /tmp under read_only
    assert f"size={DEPLOYED_TMP_MIB}m" in tmp.split(":", 1)[1].split(","), (tmp, "as the container test runs it")
    env = svc["environment"]
    assert set(env) <= env_names, f"unknown LEVIT_* in compose: {sorted(set(env) - env_names)}"
    assert not levit_tokens(COMPOSE.read_text()) - env_names
    image_env = image_levit_env(DOCKERFILES["cpu"])
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
    image_env = image_levit_env(DOCKERFILES["gpu"])
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
