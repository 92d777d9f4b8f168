#!/usr/bin/env bash
# Runs the whole test suite, first with Keras 3, then with tf_keras (Keras 2).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k callback`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# The accuracy benchmark's --quick test reads Debian's Fashion-MNIST (never downloaded).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist
fi
# `pytest` (not `python -m pytest`) keeps the source tree off sys.path: the tests import the
# installed wheel, and conftest.py checks that they do.
export KERAS_SWA_TEST_INSTALLED=1
echo "== keras_swa tests with Keras 3"
pytest tests "$@"
echo "== keras_swa tests with tf_keras (TF_USE_LEGACY_KERAS=1)"
# The benchmark smoke tests run once, with Keras 3 (what the benchmarks measure); the
# multi-worker benchmark's workers use tf_keras there anyway. This keeps CI within its budget.
TF_USE_LEGACY_KERAS=1 pytest tests --ignore=tests/test_benchmarks_smoke.py \
  --ignore=tests/test_accuracy_benchmark.py "$@"
