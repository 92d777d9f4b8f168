"""Two workers, one SIGKILLed mid-run, both restarted: the same SWA result as an uninterrupted run.

tests/workers/resume_worker.py trains a linear tf_keras model with `fit` under
MultiWorkerMirroredStrategy, with `keras_swa.SWA(backup_dir=...)` and
`keras.callbacks.BackupAndRestore` sharing one backup directory. Worker 1 SIGKILLs itself in
epoch 2 (after the capture of epoch 1); worker 0 then hangs in the next all-reduce and is killed
too; both are restarted with the same command and TF_CONFIG and must finish with the captures and
averages of an uninterrupted 2-worker run, which itself must match SWA written out in numpy.

Who wrote what is read from the files themselves: the workers run with different umasks (worker 0
022, worker 1 027), so a file or folder that worker 1 created has group but no "other" permission
bits. Only the chief may write SWA's and BackupAndRestore's backup and the exported model.
"""

import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "resume_worker.py")
TIMEOUT_S = 120
UMASKS = (0o022, 0o027)  # worker 0 (the chief), worker 1
KILL_AT = "2:1"  # worker 1 dies at the end of batch 1 of epoch 2 (0-based)

sys.path.insert(0, os.path.join(ROOT, "tests", "workers"))
import resume_worker  # noqa: E402  (the epochs, SWA start and learning rates the workers use)
import swa_worker  # noqa: E402  (the data, batch size and initial weights)
from cluster import free_ports, worker_env  # noqa: E402


def _start(out_dir, ports, tag, extra=()):
    """Starts the two workers of `ports`; returns `(process, log)` pairs."""
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    temp = os.path.join(out_dir, "tmp")  # the workers' temporary directory, checked after
    os.makedirs(temp, exist_ok=True)
    workers = []
    for i in range(len(ports)):
        # tf_keras: Keras 3 `fit` fails under MultiWorkerMirroredStrategy.
        env = worker_env(True, {"cluster": cluster, "task": {"type": "worker", "index": i}})
        env["TMPDIR"] = temp
        log = open(os.path.join(out_dir, f"log_{tag}_{i}.txt"), "w+")
        process = subprocess.Popen(
            [sys.executable, WORKER, str(out_dir), *extra],
            env=env,
            cwd=str(out_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=UMASKS[i],
        )
        workers.append((process, log))
    return workers


def _tails(workers):
    text = []
    for _, log in workers:
        log.flush()
        log.seek(0)
        text.append(log.read()[-3000:])
    return "\n----\n".join(text)


def _kill_all(workers):
    for process, log in workers:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _finish(workers):
    """Waits for every worker to exit successfully; returns their results by task."""
    try:
        for process, _ in workers:
            process.wait(timeout=TIMEOUT_S)
        failed = any(process.returncode for process, _ in workers)
        if failed:
            pytest.fail("a worker failed:\n" + _tails(workers))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the workers did not finish within {TIMEOUT_S} s:\n" + _tails(workers))
    finally:
        _kill_all(workers)
    out_dir = os.path.dirname(workers[0][1].name)
    results = []
    for i in range(len(workers)):
        with np.load(os.path.join(out_dir, f"result_worker{i}.npz"), allow_pickle=True) as f:
            results.append({k: f[k] for k in f.files})
    return results


def _written_by_worker1(root):
    """Paths under `root` that worker 1 created (its umask leaves no "other" bits)."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o070 and not mode & 0o007:
                found.append(os.path.relpath(path, root))
    return found


def _numpy_swa(x, y, w, b):
    """SGD on the mean squared error of `x @ w + b` (float64), then the mean of the captures."""
    captures = []
    batch = swa_worker.GLOBAL_BATCH
    for epoch in range(resume_worker.EPOCHS):
        lr = swa_worker.LEARNING_RATE if epoch < resume_worker.START_EPOCH else resume_worker.SWA_LR
        for s in range(0, len(x), batch):
            xb, yb = x[s : s + batch], y[s : s + batch]
            residual = xb @ w + b - yb
            w = w - lr * 2.0 * xb.T @ residual / len(xb)
            b = b - lr * 2.0 * residual.sum(axis=0) / len(xb)
        if epoch >= resume_worker.START_EPOCH:
            captures.append([w, b])
    return [np.mean([c[i] for c in captures], axis=0) for i in range(2)]


def test_worker_killed_and_both_restarted_match_uninterrupted_run(tmp_path):
    reference_dir = tmp_path / "uninterrupted"
    run_dir = tmp_path / "interrupted"
    reference_dir.mkdir()
    run_dir.mkdir()

    # The uninterrupted reference and the run that gets killed, side by side.
    reference_workers = _start(reference_dir, free_ports(2), "uninterrupted")
    ports = free_ports(2)
    killed = _start(run_dir, ports, "killed", ["--kill-at", KILL_AT])
    try:
        killed[1][0].wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_all(killed + reference_workers)
        pytest.fail("worker 1 did not reach its kill point:\n" + _tails(killed))
    # Worker 0 now waits for worker 1 in the next all-reduce (or fails): kill it too.
    worker0_finished = killed[0][0].poll() == 0
    log_text = _tails(killed)
    _kill_all(killed)
    assert killed[1][0].returncode == -signal.SIGKILL, log_text
    assert not worker0_finished, log_text
    assert not list(run_dir.glob("result_*.npz"))

    # What the crash left: the chief's checkpoints only, nothing of worker 1's.
    backup = run_dir / "backup"
    assert sorted(os.listdir(backup)) == ["chief", "keras_swa"], os.listdir(backup)
    assert any(name.startswith("swa_state-8.") for name in os.listdir(backup / "keras_swa"))
    assert _written_by_worker1(backup) == []

    # Restart both with the same command and cluster; let them finish.
    resumed = _finish(_start(run_dir, ports, "resumed"))
    reference = _finish(reference_workers)

    x, y = (a.astype(np.float64) for a in swa_worker.data())
    w0, b0 = (a.astype(np.float64) for a in swa_worker.initial_weights([(4, 1), (1,)]))
    expected = _numpy_swa(x, y, w0, b0)
    steps_per_epoch = swa_worker.NUM_SAMPLES // swa_worker.GLOBAL_BATCH
    capture_steps = [
        steps_per_epoch * (e + 1) for e in range(resume_worker.START_EPOCH, resume_worker.EPOCHS)
    ]
    for ref, result in zip(reference, resumed):
        # The reference ran every epoch and is plain SWA; the restarted run trained only the
        # epochs after the last backup, so its first capture came from the backup.
        np.testing.assert_array_equal(ref["epochs_run"], range(resume_worker.EPOCHS))
        np.testing.assert_array_equal(result["epochs_run"], [2, 3])
        assert int(ref["n_averaged"]) == int(result["n_averaged"]) == len(capture_steps) == 3
        np.testing.assert_array_equal(ref["capture_steps"], capture_steps)
        np.testing.assert_array_equal(result["capture_steps"], capture_steps)
        for a, value in zip(ref["averages"], expected):
            np.testing.assert_allclose(a, value, rtol=1e-5, atol=1e-5)
        for a, b in zip(result["averages"], ref["averages"]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        for weight, average in zip(result["weights"], result["averages"]):
            np.testing.assert_array_equal(weight, average)  # the model holds the averages
    for a, b in zip(resumed[0]["averages"], resumed[1]["averages"]):
        np.testing.assert_array_equal(a, b)

    # The chief alone wrote the exported model; both backups are gone, and so is every
    # temporary folder of worker 1 (its backups and its private copy of the export).
    assert sorted(os.listdir(run_dir / "export")) == ["model"]
    assert (run_dir / "export" / "model" / "saved_model.pb").exists()
    assert _written_by_worker1(run_dir / "export") == []
    assert os.listdir(backup) == []
    # (Bytecode caches aside, and autograph's generated sources, which a SIGKILLed process
    # cannot clean up.)
    leftovers = [
        n
        for n in os.listdir(run_dir / "tmp")
        if n != "__pycache__" and not n.startswith("__autograph_generated_file")
    ]
    assert leftovers == []
