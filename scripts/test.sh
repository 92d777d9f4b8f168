#!/usr/bin/env bash
# Runs the whole test suite, first with Keras 3, then with tf_keras (Keras 2).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k callback`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
echo "== keras_swa tests with Keras 3"
python -m pytest tests "$@"
echo "== keras_swa tests with tf_keras (TF_USE_LEGACY_KERAS=1)"
TF_USE_LEGACY_KERAS=1 python -m pytest tests "$@"
