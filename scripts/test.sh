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
# Two pytest workers, one test file at a time each (`--dist loadfile`, so a file's module-scoped
# fixtures, such as its MirroredStrategy, stay in one process): most tests drive small models
# whose Python overhead keeps one core busy, so two workers use both cores. KERAS_SWA_TEST_WORKERS=0
# runs everything in this process.
XDIST=(-n "${KERAS_SWA_TEST_WORKERS:-2}" --dist loadfile)
# Each pass lists its 15 slowest tests, so that CI's log shows where its time budget goes.
XDIST+=(--durations=15)
echo "== keras_swa tests with Keras 3"
pytest "${XDIST[@]}" tests "$@"
echo "== keras_swa tests with tf_keras (TF_USE_LEGACY_KERAS=1)"
# Run once, with Keras 3, to keep CI within its budget: the main job, the benchmark smoke tests, the
# accuracy benchmark's screen and forked runs (the benchmarks measure Keras 3; the
# multi-worker benchmark's workers use tf_keras there anyway)
# and the multi-worker tests, whose worker processes choose their Keras version themselves
# (tf_keras for fit, Keras 3 for the custom loop) whatever the parent process uses.
TF_USE_LEGACY_KERAS=1 pytest "${XDIST[@]}" tests --ignore=tests/test_benchmarks_smoke.py \
  --ignore=tests/test_fork.py --ignore=tests/test_screening.py \
  --ignore=tests/test_accuracy_benchmark.py --ignore=tests/test_multi_worker.py \
  --ignore=tests/test_multi_worker_resume.py --ignore=tests/test_presets.py \
  --ignore=tests/test_quickstart.py "$@"
echo "== keras_swa tests with Keras 3 on JAX (KERAS_BACKEND=jax)"
# The files that cover what runs on JAX today: AveragedWeights (against numpy, packed and not),
# update_bn (its tests less tf.distribute and synchronized BN, which are tf_only), the SWA callback
# (its tests, export_dir and SwapAveragedWeights included, plus the JAX checks), the schedules,
# average_checkpoints of Keras weights files, export_saved_model (through jax2tf), crash-safe resume
# with backup_dir (SIGKILLed jobs and the file backup), keras.distribution.DataParallel (a job on 2
# host devices), SWAG and FGE (their backend-neutral tests plus the JAX checks), tf.train.Checkpoint
# refusing the JAX state, which entry point runs where (docs/backends.md), keras_swa with
# TensorFlow absent (test_without_tensorflow.py), and every example of README.md and docs/ that is
# not marked "# TensorFlow only".
KERAS_BACKEND=jax pytest "${XDIST[@]}" tests/test_averaged_weights_jax.py tests/test_backends.py \
  tests/test_update_bn.py tests/test_callback.py tests/test_jax_callback.py \
  tests/test_schedules.py tests/test_average_checkpoints.py tests/test_export.py \
  tests/test_resume.py tests/test_backup_files.py tests/test_data_parallel.py \
  tests/test_swag.py tests/test_swag_jax.py tests/test_fge.py tests/test_fge_jax.py \
  tests/test_jax_checkpoint.py tests/test_averages_packing_jax.py \
  tests/test_without_tensorflow.py tests/test_readme.py "$@"
