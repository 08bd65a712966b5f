#!/usr/bin/env bash
# Install what tests/test_page.py drives: Debian's `chromium` (system package, /usr/bin/chromium) and the
# `playwright` Python package in .venv. Playwright's own browser download is not used (and not reachable
# here): the tests launch the system binary through `executable_path`.
#
# Idempotent and quick: when chromium runs and playwright imports at the pinned version it exits at once.
# Any failure exits non-zero: the page tests then fail, never skip.
#
# Needs: apt-get as root (Debian/Ubuntu); `apt-get update` runs first when chromium must be installed.
# Env: VENV (default <repo>/.venv), CHROMIUM (default /usr/bin/chromium).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
PLAYWRIGHT_VERSION="1.65.2"

log() { printf 'browser_tools: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -x "$VENV/bin/python" ]] || die "no virtual environment at $VENV (run 'make install' first)"

if ! "$CHROMIUM" --version >/dev/null 2>&1; then
  command -v apt-get >/dev/null || die "$CHROMIUM missing and no apt-get to install Debian's chromium"
  SUDO=""
  [[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
  log "installing Debian's chromium"
  apt=($SUDO apt-get -o DPkg::Lock::Timeout=600 -qq)  # wait for another apt run rather than fail
  "${apt[@]}" update
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null
  "$CHROMIUM" --version >/dev/null 2>&1 || die "$CHROMIUM does not run after installing chromium"
fi

installed="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null || true)"
if [[ "$installed" != "$PLAYWRIGHT_VERSION" ]]; then
  log "installing playwright $PLAYWRIGHT_VERSION into $VENV"
  "$VENV/bin/pip" install --quiet "playwright==$PLAYWRIGHT_VERSION" || die "pip install playwright failed"
fi
