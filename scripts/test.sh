#!/usr/bin/env bash
# Runs the whole test suite, first with Keras 3, then with tf_keras (Keras 2).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k callback`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# `pytest` (not `python -m pytest`) keeps the source tree off sys.path: the tests import the
# installed wheel, and conftest.py checks that they do.
export KERAS_SWA_TEST_INSTALLED=1
echo "== keras_swa tests with Keras 3"
pytest tests "$@"
echo "== keras_swa tests with tf_keras (TF_USE_LEGACY_KERAS=1)"
TF_USE_LEGACY_KERAS=1 pytest tests "$@"
