"""keras_swa under MultiWorkerMirroredStrategy with two real worker processes on localhost.

Each test starts the workers of tests/workers/swa_worker.py with their own TF_CONFIG, waits for
them with a hard time limit, kills them in any case, and compares what they wrote: both workers
must hold identical averages, equal to a reference computed independently (numpy SGD for the
linear tf_keras model; the same loop on one process with MirroredStrategy on two logical CPUs,
plus numpy BatchNorm statistics, for the Keras 3 custom loop).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "swa_worker.py")
TIMEOUT_S = 120

sys.path.insert(0, os.path.join(ROOT, "tests", "workers"))
import swa_worker  # noqa: E402  (the data, batch size and initial weights the workers use)
from cluster import free_ports, worker_env  # noqa: E402


def _run(mode, out_dir, num_workers, legacy_keras):
    """Runs `num_workers` workers (0: one local process) and returns their results by task."""
    ports = free_ports(num_workers)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    commands = []
    if num_workers:
        for i in range(num_workers):
            config = {"cluster": cluster, "task": {"type": "worker", "index": i}}
            commands.append(worker_env(legacy_keras, config))
    else:
        commands.append(worker_env(legacy_keras))
    temp = os.path.join(out_dir, "tmp")  # the workers' temporary directory, checked after
    os.makedirs(temp, exist_ok=True)
    for env in commands:
        env["TMPDIR"] = temp
    processes = []
    logs = []
    try:
        for i, env in enumerate(commands):
            log = open(os.path.join(out_dir, f"log_{mode}_{i}.txt"), "w+")
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    [sys.executable, WORKER, mode, str(out_dir)],
                    env=env,
                    cwd=str(out_dir),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for p in processes:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode} workers did not finish within {TIMEOUT_S} s:\n" + _tails(logs))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in processes):
        pytest.fail(f"a {mode} worker failed:\n" + _tails(logs))
    for log in logs:
        log.close()
    tasks = [f"worker{i}" for i in range(num_workers)] or ["local0"]
    return [np.load(os.path.join(out_dir, f"result_{t}.npz"), allow_pickle=True) for t in tasks]


def _tails(logs):
    text = []
    for log in logs:
        log.flush()
        log.seek(0)
        text.append(log.read()[-3000:])
    return "\n----\n".join(text)


def _numpy_sgd_linear(x, y, w, b, lr, batch, epochs, start_epoch):
    """SGD on the mean squared error of `x @ w + b` (float64); returns end-of-epoch weights."""
    snapshots = []
    for epoch in range(epochs):
        for s in range(0, len(x), batch):
            xb, yb = x[s : s + batch], y[s : s + batch]
            residual = xb @ w + b - yb
            w = w - lr * 2.0 * xb.T @ residual / len(xb)
            b = b - lr * 2.0 * residual.sum(axis=0) / len(xb)
        if epoch >= start_epoch:
            snapshots.append([w, b])
    return snapshots


def test_tf_keras_fit_with_swa_callback_on_two_workers(tmp_path):
    results = _run("fit", tmp_path, num_workers=2, legacy_keras=True)
    x, y = (a.astype(np.float64) for a in swa_worker.data())
    w0, b0 = (a.astype(np.float64) for a in swa_worker.initial_weights([(4, 1), (1,)]))
    snapshots = _numpy_sgd_linear(
        x, y, w0, b0, swa_worker.LEARNING_RATE, swa_worker.GLOBAL_BATCH, swa_worker.EPOCHS, 1
    )
    expected = [np.mean([s[i] for s in snapshots], axis=0) for i in range(2)]
    for result in results:
        assert int(result["n_averaged"]) == 2
        for average, weight, value in zip(result["averages"], result["weights"], expected):
            np.testing.assert_allclose(average, value, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(weight, average)  # the model holds the averages
    for a, b in zip(results[0]["averages"], results[1]["averages"]):
        np.testing.assert_array_equal(a, b)
    # Only the chief (worker 0) wrote the SavedModel; the other worker left nothing behind.
    export_dir = tmp_path / "export"
    assert sorted(os.listdir(export_dir)) == ["model"]
    assert (export_dir / "model" / "saved_model.pb").exists()
    leftovers = [n for n in os.listdir(tmp_path / "tmp") if n != "__pycache__"]
    assert leftovers == []  # the non-chief's private copy is deleted (bytecode caches aside)
    import tensorflow as tf

    serve = tf.saved_model.load(str(export_dir / "model")).signatures["serving_default"]
    np.testing.assert_allclose(
        serve(features=tf.constant(x[:4], tf.float32))["output_0"].numpy(),
        x[:4] @ expected[0] + expected[1],
        rtol=1e-4,
        atol=1e-4,
    )


def test_keras3_custom_loop_with_averaged_weights_and_update_bn_on_two_workers(tmp_path):
    workers_dir = tmp_path / "workers"
    reference_dir = tmp_path / "reference"
    workers_dir.mkdir()
    reference_dir.mkdir()
    results = _run("custom", workers_dir, num_workers=2, legacy_keras=False)
    (reference,) = _run("custom-mirrored", reference_dir, num_workers=0, legacy_keras=False)
    for result in results:
        assert int(result["n_averaged"]) == 2 and int(result["seen"]) == swa_worker.NUM_SAMPLES
        for average, value in zip(result["averages"], reference["averages"]):
            np.testing.assert_allclose(average, value, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0]["averages"], results[1]["averages"]):
        np.testing.assert_array_equal(a, b)
    # BatchNorm: every replica's share (half of each global batch) through the averaged `d1`.
    x, _ = swa_worker.data()
    for result in results + [reference]:
        h = x.astype(np.float64) @ result["d1_kernel"] + result["d1_bias"]
        shares = [
            share
            for s in range(0, len(h), swa_worker.GLOBAL_BATCH)
            for share in np.array_split(h[s : s + swa_worker.GLOBAL_BATCH], 2)
        ]
        mean = np.mean([share.mean(axis=0) for share in shares], axis=0)
        variance = np.mean([share.var(axis=0) for share in shares], axis=0)
        for copy in result["moving_mean"]:
            np.testing.assert_allclose(copy, mean, rtol=1e-5, atol=1e-5)
        for copy in result["moving_variance"]:
            np.testing.assert_allclose(copy, variance, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(results[0]["moving_mean"], results[1]["moving_mean"])
