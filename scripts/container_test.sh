#!/usr/bin/env bash
# The container test as CI runs it: build docker/Dockerfile with podman, run it the hardened way (read-only
# root, uid 10001, tini, all capabilities dropped), classify, scrape /metrics, SIGTERM -> exit 0.
#
#   bash scripts/container_test.sh          # as root (or with sudo): installs podman from apt when missing
#
# CI machines reach PyPI, npm and the Debian mirror, not Docker Hub, download.pytorch.org or
# dl.fbaipublicfiles.com. For each of those the build takes the image's default when it is reachable and
# otherwise:
#   base image  python:3.11-slim -> Debian bookworm's python3.11 (debootstrap from the apt mirror, imported
#               once as localhost/levit-base:bookworm)
#   torch       download.pytorch.org/whl/cpu -> this machine's pip configuration (find-links / local indexes,
#               which must hold the CPU wheel: the Dockerfile refuses a CUDA torch)
#   weights     baked -> DOWNLOAD_WEIGHTS=false; the test then serves random weights and reports the baked-weights
#               check as skipped
# The runtime is runc with lowered ulimits: crun refuses hybrid cgroups, and raising a limit needs
# CAP_SYS_RESOURCE, which a sandboxed root may not have.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    exec sudo --preserve-env=PATH bash "$0" "$@"
fi

reachable() { [ "$(curl -s -o /dev/null --max-time 20 -w '%{http_code}' "$1" || true)" != 000 ]; }

missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
test -x .venv/bin/python || make install

flags="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
build_args=()

base=docker.io/library/python:3.11-slim
if ! podman image exists "$base" && ! podman pull -q "$base" >/dev/null 2>&1; then
    base=localhost/levit-base:bookworm
    if ! podman image exists "$base"; then
        mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
        root=$(mktemp -d)
        echo "== $base: debootstrap bookworm from ${mirror:=http://deb.debian.org/debian}"
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$root" "$mirror" >/dev/null
        tar -C "$root" -c . | podman import -q - "$base" >/dev/null
        rm -rf "$root"
    fi
    build_args+=(--build-arg "BASE_IMAGE=$base")
fi

if ! reachable https://download.pytorch.org/whl/cpu/; then
    # The build's pip gets this machine's pip settings (local wheel folders and indexes, CA bundle), mounted
    # read-only for the build only: nothing of it ends up in the image.
    conf=$(mktemp -d)/pip.conf
    mounts=$(.venv/bin/python - "$conf" <<'EOF'
import subprocess, sys
from pathlib import Path
from urllib.parse import urlparse

settings = {}
for line in subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in ("index-url", "extra-index-url", "find-links", "cert", "trusted-host"):
        settings[name] = value.strip("'\"")
mounts = set()
for name, value in settings.items():
    for item in value.split():
        path = urlparse(item).path if item.startswith("file:") else item if item.startswith("/") else None
        if path:  # an index's pages link to files beside `simple/`: mount its parent
            mounts.add(str(Path(path).parent) if name.endswith("index-url") else path)
Path(sys.argv[1]).write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
print(" ".join(sorted(mounts)))
EOF
)
    build_args+=(-v "$conf:/etc/pip.conf:ro" --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
    for path in $mounts; do build_args+=(-v "$path:$path:ro"); done
fi

if ! reachable https://dl.fbaipublicfiles.com/; then
    build_args+=(--build-arg DOWNLOAD_WEIGHTS=false)
fi

echo "== podman build ${build_args[*]}"
DEPLOY_CONTAINER_TEST=1 CONTAINER_ENGINE=podman CONTAINER_FLAGS="$flags" CONTAINER_BUILD_ARGS="${build_args[*]}" \
    .venv/bin/python -m pytest -q -rs tests/test_deploy_container.py
