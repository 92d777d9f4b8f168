"""keras_swa under `keras.distribution.DataParallel` on 2 host devices, checked with numpy.

The JAX counterpart of the MirroredStrategy tests in tests/test_distributed.py. JAX fixes its
device count when it initialises, so the work runs in a subprocess (tests/jobs/
data_parallel_job.py) started with 2 host devices; it records the weights it used and what
keras_swa produced, with and without the distribution, and the checks here are numpy's.

Tolerances: AveragedWeights' update is elementwise and runs the same on every device, so its
averages match numpy to float32 rounding (rtol 1e-6) and the single-device run bit for bit.
The BatchNorm statistics and the training in `fit` sum over a batch split across 2 devices (XLA
adds the two shards' partial sums): the order of summation differs from one device's, so the
results agree with the single-device run to float32 rounding of those sums, compounded over
`fit`'s steps (rtol 1e-5, atol 1e-6).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras_swa

pytestmark = pytest.mark.jax_only

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobs", "data_parallel_job.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUM_ORDER = dict(rtol=1e-5, atol=1e-6)  # see the module docstring


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel") / "out.npz"
    env = dict(os.environ)
    if env.get("KERAS_SWA_TEST_INSTALLED") != "1":  # else the installed wheel is under test
        env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, JOB, str(out)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def _listed(job, prefix, count):
    return [job[f"{prefix}{j}"].astype(np.float64) for j in range(count)]


def test_the_job_ran_the_keras_swa_under_test_on_two_devices(job):
    assert int(job["devices"]) == 2
    assert int(job["mesh_devices"]) == 2
    assert str(job["keras_swa_file"]) == keras_swa.__file__


# ------------------------------------------------------------------ AveragedWeights


@pytest.mark.parametrize("mode", ["swa", "ema", "ignore"])
def test_averages_equal_numpy_and_the_single_device_run(job, mode):
    n_vars = len(job[f"aw_{mode}_dp_variable_devices"])
    snapshots = [_listed(job, f"aw_{mode}_dp_snapshot{i}_", n_vars) for i in range(4)]
    for i in range(4):  # both runs saw the same weights
        for a, b in zip(snapshots[i], _listed(job, f"aw_{mode}_single_snapshot{i}_", n_vars)):
            np.testing.assert_array_equal(a, b)
    if mode == "ema":
        expected = snapshots[0]
        for snapshot in snapshots[1:]:
            expected = [0.75 * e + 0.25 * s for e, s in zip(expected, snapshot)]
    else:
        expected = [np.mean([s[j] for s in snapshots], axis=0) for j in range(n_vars)]
    assert int(job[f"aw_{mode}_dp_count"]) == 4
    for j in range(n_vars):
        dp = job[f"aw_{mode}_dp_average{j}"]
        assert dp.dtype == np.float32
        np.testing.assert_allclose(dp, expected[j], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(dp, job[f"aw_{mode}_single_average{j}"])


@pytest.mark.parametrize("mode", ["swa", "ema", "ignore"])
def test_averages_are_replicated_like_the_variables_and_traced_once(job, mode):
    # (devices holding it, fully replicated) per variable; the count last among the averages.
    assert job[f"aw_{mode}_dp_variable_devices"].tolist() == [[2, 1]] * 10
    assert job[f"aw_{mode}_dp_average_devices"].tolist() == [[2, 1]] * 11
    assert job[f"aw_{mode}_dp_average_placed_as_variable"].all()
    assert int(job[f"aw_{mode}_dp_traces"]) == 1  # 4 updates, one compiled program


def test_swap_assign_nan_check_reset_and_reload_under_the_distribution(job):
    key = "aw_swa_dp"
    assert job[f"{key}_swapped"].all() and job[f"{key}_restored"].all()
    assert job[f"{key}_swapped_devices"].tolist() == [[2, 1]] * 10
    assert bool(job[f"{key}_nan_refused"]) and job[f"{key}_nan_kept"].all()
    assert job[f"{key}_assigned"].all()
    assert job[f"{key}_assigned_devices"].tolist() == [[2, 1]] * 10
    assert job[f"{key}_reloaded"].all()
    # After reset (10 averages), after load_weights (10 averages and the count).
    assert job[f"{key}_reset_reload_devices"].tolist() == [[2, 1]] * 21
    assert int(job[f"{key}_traces_after_reload"]) == 1


def test_averages_made_after_the_distribution_is_unset_stay_with_the_variables(job):
    assert job["aw_late_placed_as_variable"].all()
    assert job["aw_late_devices"].tolist() == [[2, 1]] * 10


def test_averages_of_a_model_built_outside_the_distribution_are_refused(job):
    assert "built outside the keras.distribution" in str(job["aw_mixed_error"])


# ------------------------------------------------------------------ update_bn


def _dense(h, kernel, bias):
    return h @ kernel + bias


def _bn_train(h, gamma, beta, epsilon):
    return gamma * (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + epsilon) + beta


def _cumulative(batches):
    sizes = np.array([len(b) for b in batches], np.float64)
    mean = sizes @ np.array([b.mean(axis=0) for b in batches]) / sizes.sum()
    var = sizes @ np.array([b.var(axis=0) for b in batches]) / sizes.sum()
    return mean, var


@pytest.mark.parametrize("n", [44, 45])  # last batch 12 (sharded 6 + 6), or 13 (replicated)
def test_update_bn_statistics_are_those_of_the_whole_data(job, n):
    w = {k[len("bn_weights_"):]: job[k].astype(np.float64)
         for k in job if k.startswith("bn_weights_")}
    eps1 = float(job["bn_epsilon"][0])  # bn2's inputs come before bn2 normalises them
    x = job["bn_x"][:n].astype(np.float64)
    in1 = [_dense(x[i : i + 16], w["d1_0"], w["d1_1"]) for i in range(0, n, 16)]
    in2 = [_dense(np.maximum(_bn_train(h, w["bn1_0"], w["bn1_1"], eps1), 0.0), w["d2_0"], w["d2_1"])
           for h in in1]
    for tag in ("dp", "single"):
        key = f"bn{n}_{tag}"
        assert int(job[f"{key}_seen"]) == n
        for layer, inputs in (("bn1", in1), ("bn2", in2)):
            mean, var = _cumulative(inputs)
            np.testing.assert_allclose(job[f"{key}_{layer}_mean"], mean, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(job[f"{key}_{layer}_variance"], var, rtol=1e-5, atol=1e-5)
        assert job[f"{key}_trainable_kept"].all()
        assert job[f"{key}_momenta"].tolist() == pytest.approx([0.9, 0.99])
        assert int(job[f"{key}_traces"]) == 2  # one batch size of 16, one last batch
    for layer in ("bn1", "bn2"):
        for stat in ("mean", "variance"):
            np.testing.assert_allclose(job[f"bn{n}_dp_{layer}_{stat}"],
                                       job[f"bn{n}_single_{layer}_{stat}"], **SUM_ORDER)
    assert job[f"bn{n}_dp_batch_shards"].tolist() == [8, 8]  # a batch of 16 over 2 devices
    assert job[f"bn{n}_dp_stat_devices"].tolist() == [[2, 1]] * 4  # still replicated


# ------------------------------------------------------------------ the SWA callback in fit


def test_swa_callback_in_fit_matches_numpy_and_the_single_device_run(job):
    n_vars = 6
    for tag in ("dp", "single"):
        key = f"fit_{tag}"
        assert job[f"{key}_captures"].tolist() == [1, 2, 3]
        assert int(job[f"{key}_traces"]) == 1
        final = _listed(job, f"{key}_final_", n_vars)
        captured = [_listed(job, f"{key}_epoch{e}_", n_vars) for e in (1, 2, 3)]
        for j in range(n_vars):
            np.testing.assert_allclose(final[j], np.mean([c[j] for c in captured], axis=0),
                                       rtol=1e-6, atol=1e-6)
        # BN recomputed for the averaged weights: its inputs are dense_in's outputs on bn_data.
        x = job["fit_x"].astype(np.float64)
        h = [_dense(x[i : i + 16], final[0], final[1]) for i in range(0, len(x), 16)]
        mean, var = _cumulative(h)
        np.testing.assert_allclose(job[f"{key}_bn_mean"], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(job[f"{key}_bn_variance"], var, rtol=1e-5, atol=1e-5)
        assert float(job[f"{key}_bn_momentum"]) == pytest.approx(0.9)
    for j in range(n_vars):
        np.testing.assert_allclose(job[f"fit_dp_final_{j}"], job[f"fit_single_final_{j}"],
                                   **SUM_ORDER)
    for stat in ("bn_mean", "bn_variance"):
        np.testing.assert_allclose(job[f"fit_dp_{stat}"], job[f"fit_single_{stat}"], **SUM_ORDER)
    np.testing.assert_allclose(job["fit_dp_val_swa_loss"], job["fit_single_val_swa_loss"],
                               **SUM_ORDER)
    assert job["fit_dp_variable_devices"].tolist() == [[2, 1]] * 8
    assert job["fit_dp_average_devices"].tolist() == [[2, 1]] * 6
    assert job["fit_single_variable_devices"].tolist() == [[1, 1]] * 8


# ------------------------------------------------------------------ SWAG and FGE


def _swag_snapshots(job, tag, j):
    return np.stack([job[f"swag_{tag}_snapshot{i}_{j}"].astype(np.float64) for i in range(4)])


def test_swag_statistics_equal_numpy_and_the_single_device_run(job):
    n_vars = 10  # the MLP's trainable variables; FGE's members also hold 4 BN statistics
    for j in range(n_vars):
        snaps = _swag_snapshots(job, "dp", j)
        np.testing.assert_array_equal(snaps, _swag_snapshots(job, "single", j))
        # Numpy: the mean, the ddof=0 variance, and the last 3 (max_rank) columns w_i - mean_i
        # with mean_i the running mean after capture i, oldest first.
        running = np.cumsum(snaps, axis=0) / np.arange(1, 5).reshape((4,) + (1,) * (snaps.ndim - 1))
        np.testing.assert_allclose(job[f"swag_dp_mean{j}"], snaps.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(job[f"swag_dp_variance{j}"], snaps.var(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(job[f"swag_dp_columns{j}"], (snaps - running)[1:],
                                   rtol=1e-4, atol=1e-5)
        for name in ("mean", "variance", "columns"):
            np.testing.assert_allclose(job[f"swag_dp_{name}{j}"], job[f"swag_single_{name}{j}"],
                                       rtol=1e-6, atol=1e-7)


def test_swag_state_is_replicated_traced_once_and_draws_match_the_single_device_run(job):
    assert job["swag_dp_state_devices"].tolist() == [[2, 1]] * (3 * 10 + 1)
    assert int(job["swag_dp_traces"]) == 1
    assert job["swag_dp_sampled_devices"].tolist() == [[2, 1]] * 10
    for j in range(10):
        # The same key draws the same noise on any placement; the low-rank term's tensordot may
        # sum in another order on the mesh.
        np.testing.assert_allclose(job[f"swag_dp_draw{j}"], job[f"swag_single_draw{j}"],
                                   **SUM_ORDER)


def test_fge_members_are_the_recorded_weights_and_predict_matches_the_single_device_run(job):
    assert job["swag_dp_fge_devices"].tolist() == [[2, 1]] * 14
    for m in range(3):  # members were added after captures 1, 2 and 3
        # model.weights: layer by layer, each BN's moving statistics after its gamma and beta.
        trainable = [job[f"swag_dp_fge{m}_{j}"] for j in (0, 1, 2, 3, 6, 7, 8, 9, 12, 13)]
        for j, member_weight in enumerate(trainable):
            np.testing.assert_array_equal(member_weight, job[f"swag_dp_snapshot{m + 1}_{j}"])
    np.testing.assert_allclose(job["swag_dp_fge_predict"], job["swag_single_fge_predict"],
                               **SUM_ORDER)
