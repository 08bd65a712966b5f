"""The images: docker/Dockerfile (CPU) and docker/Dockerfile.gpu, their healthchecks, the build context."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.configs import VARIANTS
from tests.deploy.dockerfile import (
    arg_defaults,
    dockerignore_included,
    dockerignore_rules,
    env_of,
    exec_form,
    healthcheck_cmd,
    parse_dockerfile,
)
from tests.deploy.support import COMPOSE, DOCKERFILES, ROOT, FakeServer, levit_tokens, run, validate_settings


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


def console_script_target(spec: str):
    """The object a `module:attr.attr` entry point names: import the module, walk the attributes."""
    module, _, attrs = spec.partition(":")
    assert attrs, f"{spec}: no function named"
    target = importlib.import_module(module)
    for attr in attrs.split("."):
        target = getattr(target, attr)
    return target


def test_console_script_targets_exist(pyproject):
    """Every [project.scripts] entry (the images run levit-serve and levit-weights) names a callable."""
    scripts = pyproject["project"]["scripts"]
    assert {"levit-serve", "levit-weights"} <= set(scripts)
    for name, spec in scripts.items():
        assert spec.startswith(("service.", "model.")), f"{name} -> {spec}: not a module of this project"
        assert callable(console_script_target(spec)), f"{name} -> {spec} is not callable"
    for missing in ("service.__main__:no_such_main", "service.no_such_module:main"):
        with pytest.raises((ImportError, AttributeError)):
            console_script_target(missing)


def test_dockerfile_weights_baked_where_the_server_looks(dockerfile, pyproject):
    flavor, path, stages = dockerfile
    builder = next(s for s in stages[1:] if s[0].args.endswith(" AS builder"))
    args = arg_defaults(builder)
    assert args["DOWNLOAD_WEIGHTS"] == "true"
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


def run_check(cmd: list[str], env: dict[str, str]) -> int:
    argv = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
    return subprocess.run(argv, env=os.environ | env, capture_output=True, timeout=30, check=False).returncode


def test_healthcheck_commands_really_probe():
    """Run the image's and compose's healthcheck commands against a fake server: 200 -> 0, 503 -> != 0."""
    server = FakeServer({"/healthz": (200, b"ok"), "/readyz": (200, b"ok")})
    try:
        compose_test = yaml.safe_load(COMPOSE.read_text())["services"]["levit-serve"]["healthcheck"]["test"]
        assert compose_test[0] == "CMD"
        compose_cmd = [a.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}") for a in compose_test[1:]]
        for path in DOCKERFILES.values():
            cmd = healthcheck_cmd(parse_dockerfile(path)[-1])
            assert run_check(cmd, {"LEVIT_HTTP_PORT": str(server.port)}) == 0
        assert run_check(compose_cmd, {}) == 0
        server.routes = {"/healthz": (503, b"no"), "/readyz": (503, b"draining")}
        for path in DOCKERFILES.values():
            cmd = healthcheck_cmd(parse_dockerfile(path)[-1])
            assert run_check(cmd, {"LEVIT_HTTP_PORT": str(server.port)}) != 0
        assert run_check(compose_cmd, {}) != 0
    finally:
        server.close()


def test_dockerignore_keeps_context_small_and_complete():
    rules = dockerignore_rules(ROOT / ".dockerignore")
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
