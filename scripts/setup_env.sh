# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv with keras_swa and its test
# dependencies, installing what a fresh Debian machine lacks. Fails loudly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${KERAS_SWA_VENV:-$ROOT/.venv}"

_as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

apt_install() {  # apt_install PACKAGE...: installs Debian packages, or says exactly what to run
  if command -v apt-get >/dev/null 2>&1; then
    echo "+ apt-get install -y $*" >&2
    if _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
      || { _as_root apt-get update -qq && \
           _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }; then
      return 0
    fi
  fi
  echo "error: could not install $*. Install it yourself: sudo apt-get install $*" >&2
  exit 1
}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  apt_install python3 python3-venv
fi
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "error: keras_swa needs Python >= 3.10; $PYTHON is $("$PYTHON" --version 2>&1)." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt_install python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi
# keras_swa itself is installed from a freshly built wheel (not the source tree), so the tests
# check what users get; its dependencies (the `test` extra: pytest, tf_keras, jax; the `bench`
# extra: absl-py, matplotlib) are installed once, and again when pyproject.toml changes.
WHEELS="$(mktemp -d)"
"$VENV/bin/python" -m pip wheel -q --no-deps -w "$WHEELS" "$ROOT" >/dev/null
rm -rf "$ROOT/build" "$ROOT"/*.egg-info
WHEEL="$(ls "$WHEELS"/keras_swa_tf-*.whl)"
STAMP="$VENV/.keras_swa-deps-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "+ installing keras_swa's dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q "$WHEEL[test,bench]"
  touch "$STAMP"
fi
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$WHEEL"
rm -rf "$WHEELS"
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
