#!/usr/bin/env bash
# Wheels the lent device machine lacks (Python 3.12, no network there), into .whl/ (git-ignored), for
# `bench/device.sh`. The versions are this checkout's own environment's, so the device runs what the tests ran:
# grpcio travels too, because service/grpc/gen refuses runtimes older than the grpcio-tools that generated it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
packages=(
  fastapi starlette uvicorn httptools python-multipart pydantic pydantic-core pydantic-settings python-dotenv
  typing-extensions typing-inspection annotated-types annotated-doc anyio h11 opentelemetry-api
  grpcio grpcio-health-checking grpcio-reflection protobuf swagger-ui-bundle click prometheus-client
)
pins=()
for name in "${packages[@]}"; do
  version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
fresh=$(mktemp -d)  # the previous set stays until this one is complete
{ "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$fresh" "${pins[@]}" 2>&1; } | { grep -v "^WARNING: Location" || true; }
[ "$(ls "$fresh" | wc -l)" -eq "${#pins[@]}" ] || { echo "expected ${#pins[@]} wheels, got: $(ls "$fresh")"; exit 1; }
rm -rf .whl && mv "$fresh" .whl
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/: ${pins[*]}"
