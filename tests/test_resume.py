"""Crash and resume: a SWA job SIGKILLed at several points and restarted ends like an uninterrupted one.

The job runs on the Keras backend of this process (its environment is passed on): TensorFlow
checkpoints on TensorFlow, `.weights.h5` + JSON files on JAX (`keras_swa.backup_files`). The
kill during export runs where `SWA(export_dir=...)` does.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from keras_swa.backend import IS_KERAS_3, SUPPORTED_ARGUMENT_BACKENDS, backend_name

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobs", "resume_job.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORTS = backend_name() in SUPPORTED_ARGUMENT_BACKENDS[("SWA", "export_dir")]


def _env():
    """This process's environment (so its Keras backend), importing the keras_swa under test."""
    env = dict(os.environ)
    if env.get("KERAS_SWA_TEST_INSTALLED") != "1":  # else the installed wheel is under test
        env["PYTHONPATH"] = os.pathsep.join(
            [REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p]
        )
    return env


def _run(work, *extra):
    args = [sys.executable, JOB, str(work)] + list(extra)
    if not IS_KERAS_3:
        args.append("--legacy")
    return subprocess.run(args, capture_output=True, text=True, timeout=240, env=_env())


def _result(work):
    with np.load(os.path.join(work, "result.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    done = _run(work)
    assert done.returncode == 0, done.stderr[-3000:]
    return _result(work)


@pytest.mark.parametrize("where", ["mid_epoch", "after_capture", "bn_pass", "export"])
def test_killed_and_restarted_run_matches_uninterrupted(where, reference, tmp_path):
    if where == "export" and not EXPORTS:
        pytest.skip(f"SWA(export_dir=...) does not run on {backend_name()!r}")
    killed = _run(tmp_path, "--kill", where)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert not os.path.exists(tmp_path / "result.npz")
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = _result(tmp_path)
    assert int(result["n"]) == int(reference["n"]) == 4
    np.testing.assert_array_equal(result["captures"], reference["captures"])
    weights = sorted(k for k in reference if k.startswith("arr_"))
    for k in weights:
        np.testing.assert_allclose(result[k], reference[k], rtol=1e-6, atol=1e-6)
    # The job finished cleanly: the SavedModel is complete and SWA's backup is gone.
    assert os.path.exists(tmp_path / "model" / "saved_model.pb") == EXPORTS
    assert not os.path.exists(tmp_path / "backup" / "keras_swa")


CUSTOM_JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobs", "custom_loop_job.py")


@pytest.mark.tf_only("the custom loop checkpoints with tf.train.Checkpoint")
def test_custom_loop_with_checkpoint_manager_resumes_exactly(tmp_path):
    def run(work, *extra):
        args = [sys.executable, CUSTOM_JOB, str(work)] + list(extra)
        if not IS_KERAS_3:
            args.append("--legacy")
        return subprocess.run(args, capture_output=True, text=True, timeout=240, env=_env())

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    done = run(reference_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run(tmp_path, "--kill")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    resumed = run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, result = _result(reference_dir), _result(tmp_path)
    assert int(result["n"]) == int(reference["n"]) == 4
    for k in sorted(k for k in reference if k.startswith("arr_")):
        np.testing.assert_allclose(result[k], reference[k], rtol=1e-6, atol=1e-6)
