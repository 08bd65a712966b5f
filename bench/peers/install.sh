#!/usr/bin/env bash
# Install the peer servers that bench/peers measures levit-serve against, each in its own venv under
# .peers/ (gitignored), plus the one checkpoint they all serve. Idempotent: a step whose stamp names the
# same pins is skipped, so a second run takes seconds. Any failure exits non-zero.
#
#   .peers/torch/            torch + torchvision + timm, shared by every peer venv (a CUDA build of
#                            torch: the only torchvision that imports on x86_64 here; it runs on the CPU)
#   .peers/torchserve/       torchserve + torch-model-archiver (needs a JDK: java 17)
#   .peers/litserve/         litserve
#   .peers/mlserver/         mlserver 1.7.1 (uvloop<0.22: 1.7.1 crashes under uvloop 0.23)
#   .peers/fastapi/          fastapi + uvicorn + python-multipart
#   .peers/levit_128s.pth    timm levit_128s, torch.manual_seed(0), random init: the shared weights
#
# Sharing torch: each peer venv gets `shared-torch.pth` in its site-packages, which appends the torch
# venv's site-packages to sys.path (after the peer's own). pip in the peer venv then sees torch & co. as
# installed; installs are constrained to the torch venv's exact versions (`pip freeze` of it), so pip
# never replaces (or uninstalls from) the shared environment.
#
# Usage: bench/peers/install.sh            Env: PEERS_DIR (default <repo>/.peers), PYTHON (python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="${PEERS_DIR:-$ROOT/.peers}"
PYTHON="${PYTHON:-python3}"

TORCH_PINS="torch==2.14.1 torchvision==0.29.1 timm==1.0.31"
TORCHSERVE_PINS="torchserve==0.12.0 torch-model-archiver==0.12.0"
LITSERVE_PINS="litserve==0.2.19 python-multipart==0.0.34"  # multipart uploads: form parsing needs it
MLSERVER_PINS="mlserver==1.7.1 uvloop<0.22"
FASTAPI_PINS="fastapi==0.163.2 uvicorn==0.54.0 python-multipart==0.0.34"
CHECKPOINT="$PEERS/levit_128s.pth"

STAMPS="$PEERS/stamps"
mkdir -p "$STAMPS"

log() { printf 'peers-install: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
stamp_of() { printf '%s' "$*" | sha1sum | cut -c1-12; }
quiet() {  # run a command, print its output only when it fails
  local out rc=0
  out="$("$@" 2>&1)" || rc=$?
  if [[ $rc -ne 0 ]]; then printf '%s\n' "$out" >&2; return $rc; fi
}
pip_in() {
  local venv="$1"; shift
  quiet "$venv/bin/pip" install --disable-pip-version-check --no-input "$@"
}

java_tool() {
  if command -v java >/dev/null; then return 0; fi
  log "java is missing: apt-get install openjdk-17-jdk-headless (TorchServe's frontend is Java)"
  [[ "$(id -u)" == 0 ]] || die "installing a JDK needs root"
  quiet apt-get update -q
  DEBIAN_FRONTEND=noninteractive quiet apt-get install -y -q openjdk-17-jdk-headless
  command -v java >/dev/null || die "java still missing after installing openjdk-17-jdk-headless"
}

torch_env() {
  local venv="$PEERS/torch" stamp
  stamp="torch-$(stamp_of "$TORCH_PINS")"
  [[ -f "$STAMPS/$stamp" && -x "$venv/bin/python" ]] && return 0
  log "installing $TORCH_PINS into $venv (several GB, from this machine's disk when it has them)"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  # shellcheck disable=SC2086
  pip_in "$venv" $TORCH_PINS
  "$venv/bin/python" -c "import torch, torchvision, timm" || die "torch/torchvision/timm do not import"
  "$venv/bin/pip" freeze --disable-pip-version-check > "$venv/constraints.txt"
  rm -f "$STAMPS"/torch-* "$STAMPS"/peer-*  # every peer venv was constrained by the old freeze
  touch "$STAMPS/$stamp"
}

# peer_env NAME "PINS" "IMPORTS": a venv that sees the shared torch and holds only its own packages.
peer_env() {
  local name="$1" pins="$2" imports="$3" venv="$PEERS/$1" stamp site shared
  stamp="peer-$name-$(stamp_of "$pins")"
  [[ -f "$STAMPS/$stamp" && -x "$venv/bin/python" ]] && return 0
  log "installing $pins into $venv"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  shared="$("$PEERS/torch/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$shared" > "$site/shared-torch.pth"
  # torch needs setuptools>=77.0.3 (the shared venv has it); the venv's own older copy would shadow it
  quiet "$venv/bin/pip" uninstall --disable-pip-version-check -y setuptools
  # shellcheck disable=SC2086
  pip_in "$venv" -c "$PEERS/torch/constraints.txt" $pins
  "$venv/bin/python" - "$imports" "$shared" <<'EOF' || die "$name: imports fail or torch is not the shared one"
import importlib, sys
for module in sys.argv[1].split(","):
    importlib.import_module(module)
import torch, timm
assert torch.__file__.startswith(sys.argv[2]), f"torch from {torch.__file__}, not the shared {sys.argv[2]}"
EOF
  quiet "$venv/bin/pip" check --disable-pip-version-check || die "$name: pip check found broken requirements"
  rm -f "$STAMPS/peer-$name-"*
  touch "$STAMPS/$stamp"
}

checkpoint() {
  [[ -f "$CHECKPOINT" && -f "$STAMPS/checkpoint-$(stamp_of "$TORCH_PINS")" ]] && return 0
  log "writing $CHECKPOINT (timm levit_128s, seed 0)"
  "$PEERS/torch/bin/python" - "$CHECKPOINT" <<'EOF'
import sys, timm, torch
torch.manual_seed(0)
model = timm.create_model("levit_128s", pretrained=False)
torch.save(model.state_dict(), sys.argv[1])
EOF
  rm -f "$STAMPS"/checkpoint-*
  touch "$STAMPS/checkpoint-$(stamp_of "$TORCH_PINS")"
}

start=$SECONDS
java_tool
torch_env
peer_env torchserve "$TORCHSERVE_PINS" "ts,model_archiver"
peer_env litserve "$LITSERVE_PINS" "litserve,python_multipart"
peer_env mlserver "$MLSERVER_PINS" "mlserver,uvloop"
peer_env fastapi "$FASTAPI_PINS" "fastapi,uvicorn,python_multipart"
checkpoint
log "ready in $((SECONDS - start)) s; $(du -sh "$PEERS" | cut -f1) in $PEERS"
