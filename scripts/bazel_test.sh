#!/usr/bin/env bash
# Builds everything and runs every test under Bazel, offline: `bazel test //...` with Debian's
# bazel-bootstrap (4.2.3) and the project's venv (${KERAS_SWA_VENV:-.venv}, made by setup_env.sh).
# Each tests/test_*.py runs with Keras 3 (tf_keras twins are manual targets). Extra arguments go to
# `bazel test` (e.g. `bash scripts/bazel_test.sh --test_output=all`; targets default to //...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"

if ! command -v bazel >/dev/null 2>&1; then
  apt_install bazel-bootstrap  # Debian's Bazel 4.2.3; pulls in default-jdk-headless
fi

# The Python toolchain in WORKSPACE reads this (third_party/bazel_offline/python_venv.bzl).
KERAS_SWA_VENV="$(cd "$VENV" && pwd)"
export KERAS_SWA_VENV

targets=(//...)
for arg in "$@"; do
  case "$arg" in //*|:*) targets=() ;; esac
done
echo "== bazel test ${targets[*]:-} $* (Python: $KERAS_SWA_VENV/bin/python)"
exec bazel test "$@" "${targets[@]}"
