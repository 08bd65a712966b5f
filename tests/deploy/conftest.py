"""Session fixtures of the deployment checks: the tools, the project's contracts, rendered configs."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.dockerfile import Instr, parse_dockerfile
from tests.deploy.support import (
    CHART,
    COMPOSE,
    COMPOSE_GPU,
    DOCKERFILES,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUES_FILES,
    Tools,
    helm_args,
    install_tools,
    run,
)


@pytest.fixture(scope="session")
def tools() -> Tools:
    return install_tools()


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


@pytest.fixture(scope="session", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, Path, list[list[Instr]]]:
    path = DOCKERFILES[request.param]
    return request.param, path, parse_dockerfile(path)


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
