"""The Helm chart: lint, Kubernetes schemas, security, settings, probes, weights, GPU, autoscaling, values."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from scripts.chart_schema import CHART_MANAGED, config_schema
from tests.deploy.dockerfile import env_of, image_levit_env, parse_dockerfile
from tests.deploy.promql import adapter_rules, promql_uses
from tests.deploy.support import (
    ADAPTER_VALUES,
    CHART,
    DEPLOYED_TMP_MIB,
    DOCKERFILES,
    FULLNAME,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUES_FILES,
    FakeServer,
    helm_args,
    levit_tokens,
    run,
    validate_settings,
)


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
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: writable /tmp under the read-only root"
            if name.startswith("Deployment/"):  # the server's: the size the container test runs the image with
                [tmp] = [v for v in spec.get("volumes", []) if v["name"] == mounts["/tmp"]]
                assert tmp["emptyDir"].get("sizeLimit") == f"{DEPLOYED_TMP_MIB}Mi", (where, tmp)
            res = c.get("resources", {})
            assert res.get("limits", {}).get("memory") and res.get("requests", {}).get("cpu"), f"{where}: resources"


@pytest.mark.parametrize("values_name", sorted(VALUES_FILES))
def test_configmap_is_valid_settings(rendered, values_name, settings_cls, env_names):
    docs = rendered[values_name]
    data = one(docs, "ConfigMap")["data"]
    assert set(data) <= env_names, f"not Settings fields: {sorted(set(data) - env_names)}"
    values = chart_values(values_name)
    flavor = "gpu" if values["gpu"]["enabled"] else "cpu"
    image_env = image_levit_env(DOCKERFILES[flavor])
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


def test_values_schema_mirrors_settings(settings_cls):
    """values.schema.json accepts exactly the Settings fields the chart does not manage, with their limits."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    expected = config_schema(settings_cls)
    actual = schema["properties"]["config"]
    assert actual == expected, (
        "values.schema.json `config` is out of date with service.settings.Settings; "
        "regenerate it with `make chart-schema` (scripts/chart_schema.py)"
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


def test_bfloat16_renders_for_cpu_nodes(tools):
    """bfloat16 runs on CPUs with AMX (the server refuses it at start elsewhere), so the chart lets it through."""
    cmd = [tools.helm, "template", RELEASE, str(CHART), "--show-only", "templates/configmap.yaml"]
    data = yaml.safe_load(run([*cmd, "--set", "config.LEVIT_DTYPE=bfloat16"]).stdout)["data"]
    assert data["LEVIT_DTYPE"] == "bfloat16" and data["LEVIT_DEVICE"] == "cpu"


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
    http = FakeServer({"/readyz": (200, b"ok"), "/v1/model": (200, b'{"variant": "LeViT_128S"}')})
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
