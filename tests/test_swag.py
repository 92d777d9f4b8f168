"""Tests for `keras_swa.swag.SWAG` against numpy statistics of the recorded captures.

Backend-neutral except where marked `tf_only`: they run on TensorFlow (Keras 3 and tf_keras) and
in the JAX pass (`KERAS_BACKEND=jax`); JAX's own checks are in tests/test_swag_jax.py.

Deviation convention (Maddox et al. 2019, Algorithm 1): after capture i (1-based) with running
mean mu_i = mean(w_1..w_i), the column is w_i - mu_i; the factor D holds the last K columns.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_swa.averaged_weights import AveragedWeights
from keras_swa import backend
from keras_swa.backend import keras
from keras_swa.swag import SWAG


def _dense_model(units=(3,), inputs=4, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((inputs,))] + [keras.layers.Dense(u) for u in units]
    return keras.Sequential(layers)


def _capture(model, swag, rng, count, offset=0.0, spread=1.0, others=()):
    """Sets random weights `count` times, calls `update()` each time; returns the flat captures."""
    flat = []
    for _ in range(count):
        for v in model.trainable_variables:
            v.assign((offset + spread * rng.normal(size=v.shape)).astype("float32"))
        flat.append(np.concatenate([v.numpy().ravel() for v in model.trainable_variables]))
        swag.update()
        for other in others:
            other.update()
    return np.stack(flat).astype(np.float64)


def _flat(tensors, leading=0):
    arrays = [np.asarray(t, np.float64) for t in tensors]
    if leading:
        return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)
    return np.concatenate([a.ravel() for a in arrays])


def _np_deviations(captures, k):
    """The last `k` columns w_i - mean(w_1..w_i), oldest first (numpy, float64)."""
    running_means = np.cumsum(captures, axis=0) / np.arange(1, len(captures) + 1)[:, None]
    return (captures - running_means)[-k:]


# ---------------------------------------------------------------------------------------------
# The statistics.


def test_mean_variance_and_deviations_match_numpy_and_swa():
    model = _dense_model(units=(5, 3))
    swag = SWAG(model, max_rank=4)
    swa = AveragedWeights(model)
    captures = _capture(model, swag, np.random.default_rng(1), 7, offset=0.5, others=[swa])

    assert int(swag.n_averaged.numpy()) == 7 and swag.rank == 4 and swag.max_rank == 4
    mean = _flat(swag.mean())
    np.testing.assert_allclose(mean, captures.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, _flat(swa.averages), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_flat(swag.variances()), captures.var(axis=0, ddof=0),
                               rtol=1e-5, atol=1e-6)
    deviations = _flat(swag.deviation_columns(), leading=1)
    assert deviations.shape == (4, captures.shape[1])
    np.testing.assert_allclose(deviations, _np_deviations(captures, 4), rtol=1e-5, atol=1e-6)
    # Shapes follow the tracked variables, with the rank first for the columns.
    for var, col in zip(model.trainable_variables, swag.deviation_columns()):
        assert tuple(col.shape) == (4,) + tuple(var.shape)
    # `assign_to` writes the SWA mean, as for AveragedWeights.
    swag.assign_to()
    np.testing.assert_allclose(_flat(model.trainable_variables), captures.mean(0), atol=1e-6)


def test_fewer_captures_than_rank():
    model = _dense_model()
    swag = SWAG(model, max_rank=5)
    captures = _capture(model, swag, np.random.default_rng(2), 3)
    assert swag.rank == 3
    np.testing.assert_allclose(_flat(swag.deviation_columns(), leading=1),
                               _np_deviations(captures, 3), atol=1e-6)
    # The unfilled columns are zero, so the buffer's D D^T is that of the filled columns.
    assert all(np.all(d.numpy()[3:] == 0) for d in swag.deviations)


def test_variance_is_stable_far_from_zero():
    # mean ~ 300, std ~ 1e-3: sq_mean - mean^2 in float32 would be pure rounding noise
    # (float32 spacing at 9e4 is ~0.008, far above the variance 1e-6).
    model = _dense_model()
    swag = SWAG(model, max_rank=2)
    captures = _capture(model, swag, np.random.default_rng(3), 50, offset=300.0, spread=1e-3)
    expected = captures.var(axis=0)
    np.testing.assert_allclose(_flat(swag.variances()), expected, rtol=0.05)


def test_reset_forgets_everything():
    model = _dense_model()
    swag = SWAG(model, max_rank=3)
    _capture(model, swag, np.random.default_rng(4), 5, offset=10.0)
    swag.reset()
    captures = _capture(model, swag, np.random.default_rng(5), 2)
    np.testing.assert_allclose(_flat(swag.mean()), captures.mean(0), atol=1e-6)
    np.testing.assert_allclose(_flat(swag.variances()), captures.var(0), atol=1e-6)
    np.testing.assert_allclose(_flat(swag.deviation_columns(), leading=1),
                               _np_deviations(captures, 2), atol=1e-6)
    assert all(np.all(d.numpy()[2:] == 0) for d in swag.deviations)


# ---------------------------------------------------------------------------------------------
# Sampling.


@pytest.mark.parametrize(
    "diag,cov,num",
    [(True, True, 2000), (True, False, 800), (False, True, 800)],
)
def test_sample_moments_match_the_gaussian(diag, cov, num):
    model = _dense_model(units=(2,), inputs=2)  # 6 weights
    k = 3
    swag = SWAG(model, max_rank=k)
    captures = _capture(model, swag, np.random.default_rng(6), 5, offset=0.3)
    scale = 0.7
    # The paper's covariance, written out from the captures: scale * (diag(var) + D D^T/(K-1)).
    d = _np_deviations(captures, k)
    expected_cov = np.zeros((captures.shape[1],) * 2)
    if diag:
        expected_cov += np.diag(captures.var(0))
    if cov:
        expected_cov += d.T @ d / (k - 1)
    expected_cov *= scale

    draws = np.stack(
        [_flat(swag.sample_vector(scale=scale, diag=diag, cov=cov, seed=s)) for s in range(num)]
    )
    mean_error = np.abs(draws.mean(0) - captures.mean(0))
    standard_error = np.sqrt(np.diag(expected_cov) / num)
    assert np.all(mean_error <= 5 * standard_error + 1e-6), (mean_error, standard_error)
    empirical_cov = np.cov(draws, rowvar=False, ddof=1)
    # Standard error of a covariance estimate: sqrt((S_ii S_jj + S_ij^2) / N).
    sd = np.sqrt(np.diag(expected_cov))
    cov_se = np.sqrt((np.outer(sd, sd) ** 2 + expected_cov**2) / num)
    assert np.all(np.abs(empirical_cov - expected_cov) <= 5 * cov_se + 1e-7), (
        empirical_cov, expected_cov)


def test_paper_default_scale_and_seeds():
    model = _dense_model(units=(2,), inputs=1)
    swag = SWAG(model, max_rank=2, seed=0)
    _capture(model, swag, np.random.default_rng(7), 4)
    a = _flat(swag.sample_vector(seed=3))
    np.testing.assert_array_equal(a, _flat(swag.sample_vector(seed=3)))
    assert not np.allclose(a, _flat(swag.sample_vector(seed=4)))
    assert not np.allclose(_flat(swag.sample_vector()), _flat(swag.sample_vector()))
    # Same draw with explicit scale 0.5 (the paper's 1/sqrt(2) factors).
    np.testing.assert_array_equal(a, _flat(swag.sample_vector(scale=0.5, seed=3)))
    # scale=0: every draw is the mean.
    np.testing.assert_allclose(_flat(swag.sample_vector(scale=0.0, seed=1)), _flat(swag.mean()))


def test_sample_writes_the_draw_into_the_model():
    model = _dense_model(units=(3,))
    swag = SWAG(model, max_rank=3)
    _capture(model, swag, np.random.default_rng(8), 4)
    expected = _flat(swag.sample_vector(scale=0.5, seed=9))
    swag.sample(scale=0.5, seed=9)
    np.testing.assert_array_equal(_flat(model.trainable_variables), expected)


# ---------------------------------------------------------------------------------------------
# Bayesian model averaging.


def _bn_classifier():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6, name="hidden")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5, name="bn")(h)
    h = keras.layers.Activation("relu")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(h)
    return keras.Model(inputs, outputs)


def _np_forward(weights, x, bn_x, epsilon):
    """Dense -> BN (statistics recomputed on `bn_x` in one batch) -> ReLU -> Dense -> softmax."""
    (w1, b1, gamma, beta, w2, b2) = weights
    h_bn = bn_x @ w1 + b1
    mean, var = h_bn.mean(0), h_bn.var(0)
    h = np.maximum(gamma * (x @ w1 + b1 - mean) / np.sqrt(var + epsilon) + beta, 0.0)
    logits = h @ w2 + b2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_predict_averages_probabilities_and_restores_the_model():
    model = _bn_classifier()
    swag = SWAG(model, max_rank=3)
    rng = np.random.default_rng(10)
    for _ in range(4):
        for v in model.trainable_variables:
            v.assign(v + 0.3 * rng.normal(size=v.shape).astype("float32"))
        swag.update()
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(size=6).astype("float32"))
    before = [v.numpy().copy() for v in model.variables]
    x = rng.normal(size=(5, 4)).astype("float32")
    bn_x = rng.normal(size=(16, 4)).astype("float32") + 1.0

    probs = swag.predict(x, num_samples=2, bn_data=bn_x, bn_batch_size=16, seed=11, scale=0.5)

    seeds = np.random.default_rng(11).integers(0, 2**31 - 1, size=2)
    expected = np.mean(
        [
            _np_forward(
                [np.asarray(t, np.float64) for t in swag.sample_vector(seed=int(s))],
                x.astype(np.float64), bn_x.astype(np.float64), bn.epsilon,
            )
            for s in seeds
        ],
        axis=0,
    )
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_predict_from_logits_and_restore_on_error():
    model = _dense_model(units=(3,))
    swag = SWAG(model, max_rank=2)
    _capture(model, swag, np.random.default_rng(12), 3)
    before = [v.numpy().copy() for v in model.variables]
    x = np.random.default_rng(13).normal(size=(4, 4)).astype("float32")
    probs = swag.predict(x, num_samples=2, seed=1, from_logits=True)
    seeds = np.random.default_rng(1).integers(0, 2**31 - 1, size=2)
    expected = []
    for s in seeds:
        w, b = [np.asarray(t, np.float64) for t in swag.sample_vector(seed=int(s))]
        logits = x @ w + b
        e = np.exp(logits - logits.max(-1, keepdims=True))
        expected.append(e / e.sum(-1, keepdims=True))
    np.testing.assert_allclose(probs, np.mean(expected, 0), atol=1e-5)
    with pytest.raises(Exception):
        swag.predict(np.ones((2, 7), "float32"), num_samples=2)  # wrong input width
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


# ---------------------------------------------------------------------------------------------
# Checkpoints, distribution, errors.


@pytest.mark.tf_only("tf.train.Checkpoint carries tf.Variables")
def test_checkpoint_round_trip(tmp_path):
    model = _dense_model(units=(3,))
    swag = SWAG(model, max_rank=3)
    _capture(model, swag, np.random.default_rng(14), 5)
    path = tf.train.Checkpoint(swag=swag).save(str(tmp_path / "ckpt"))
    restored = SWAG(model, max_rank=3)
    tf.train.Checkpoint(swag=restored).restore(path).assert_existing_objects_matched()
    assert int(restored.n_averaged.numpy()) == 5
    for a, b in [
        (swag.mean(), restored.mean()),
        (swag.variances(), restored.variances()),
        (swag.deviation_columns(), restored.deviation_columns()),
        (swag.sample_vector(seed=2), restored.sample_vector(seed=2)),
    ]:
        np.testing.assert_array_equal(_flat(a), _flat(b))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert any("m2" in n for n in names) and any("deviations" in n for n in names), names


def test_weights_file_round_trip_restores_the_whole_state(tmp_path):
    model = _dense_model(units=(5, 3))
    swag = SWAG(model, max_rank=3)
    rng = np.random.default_rng(15)
    captures = _capture(model, swag, rng, 5)  # 5 captures: the ring buffer has wrapped
    path = tmp_path / "swag.weights.h5"
    swag.save_weights(path)
    restored = SWAG(model, max_rank=3)
    restored.load_weights(path)
    assert int(restored.n_averaged.numpy()) == 5
    np.testing.assert_allclose(_flat(restored.mean()), captures.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(restored.variances()), captures.var(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_flat(restored.deviation_columns(), leading=1),
                               _np_deviations(captures, 3), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(_flat(swag.sample_vector(seed=4)),
                                  _flat(restored.sample_vector(seed=4)))
    # The restored ring buffer goes on where the saved one stopped: capture 6 replaces the
    # oldest column, and the mean and variance are those of all 6 captures.
    sixth = _capture(model, restored, rng, 1)
    both = np.concatenate([captures, sixth])
    np.testing.assert_allclose(_flat(restored.mean()), both.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(restored.variances()), both.var(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_flat(restored.deviation_columns(), leading=1),
                               _np_deviations(both, 3), rtol=1e-4, atol=1e-5)


def test_a_mismatched_store_is_refused_and_changes_nothing(tmp_path):
    model = _dense_model(units=(3,))
    swag = SWAG(model, max_rank=3)
    _capture(model, swag, np.random.default_rng(16), 2)
    store = {}
    swag.save_own_variables(store)
    other = SWAG(model, max_rank=2)
    captures = _capture(model, other, np.random.default_rng(17), 1)
    with pytest.raises(ValueError, match="max_rank=3"):
        other.load_own_variables(store)
    wider = SWAG(_dense_model(units=(4,)), max_rank=3)
    with pytest.raises(ValueError, match=r"shapes \[\[4, 3\], \[3\]\]"):
        wider.load_own_variables(store)
    averaged_store = {}
    averaged = AveragedWeights(model)
    averaged.update()
    averaged.save_own_variables(averaged_store)
    with pytest.raises(ValueError, match="not saved by `SWAG.save_own_variables`"):
        other.load_own_variables(averaged_store)
    with pytest.raises(ValueError, match="must end in `.weights.h5`"):
        other.save_weights(tmp_path / "swag.h5")
    assert list(tmp_path.iterdir()) == []
    assert int(other.n_averaged.numpy()) == 1
    np.testing.assert_allclose(_flat(other.mean()), captures[0], rtol=1e-6)


@pytest.mark.tf_only("tf.distribute")
def test_mirrored_strategy_keeps_replicas_identical():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _dense_model(units=(3,))
        swag = SWAG(model, max_rank=2)
    captures = _capture(model, swag, np.random.default_rng(15), 3)
    for var in swag.m2s + swag.deviations:
        local = [np.asarray(v) for v in strategy.experimental_local_results(var)]
        assert len(local) == 2
        np.testing.assert_array_equal(local[0], local[1])
    np.testing.assert_allclose(_flat(swag.variances()), captures.var(0), atol=1e-6)
    np.testing.assert_allclose(_flat(swag.deviation_columns(), leading=1),
                               _np_deviations(captures, 2), atol=1e-6)
    expected = _flat(swag.sample_vector(seed=4))
    swag.sample(seed=4)
    for var in model.trainable_variables:
        mirrored = backend.tf_variable(var)
        local = [np.asarray(v) for v in strategy.experimental_local_results(mirrored)]
        assert len(local) == 2
        np.testing.assert_array_equal(local[0], local[1])
    np.testing.assert_array_equal(_flat(model.trainable_variables), expected)


def test_nonfinite_captures_leave_the_statistics_alone():
    model = _dense_model()
    swag = SWAG(model, max_rank=2)
    captures = _capture(model, swag, np.random.default_rng(16), 3)
    saved = [np.array(v) for v in swag.m2s + swag.deviations + swag.averages]
    kernel = model.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(FloatingPointError, match="n_averaged=3"):
        swag.update()
    skipping = SWAG(model, max_rank=2, nonfinite="skip")
    with pytest.warns(UserWarning, match="skipped"):
        assert skipping.update() is False
    assert int(swag.n_averaged.numpy()) == 3 and int(skipping.n_averaged.numpy()) == 0
    for before, v in zip(saved, swag.m2s + swag.deviations + swag.averages):
        np.testing.assert_array_equal(before, np.array(v))
    np.testing.assert_allclose(_flat(swag.variances()), captures.var(0), atol=1e-6)


@pytest.mark.tf_only("tf.function")
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_captures_inside_a_tf_function(policy):
    # As AveragedWeights: inside a graph "skip" leaves the capture out, "raise" fails an Assert.
    model = _dense_model()
    swag = SWAG(model, max_rank=2, nonfinite=policy)
    capture = tf.function(swag.update)
    rng = np.random.default_rng(17)
    recorded = []
    for _ in range(2):
        for v in model.trainable_variables:
            v.assign(rng.normal(size=v.shape).astype("float32"))
        recorded.append(_flat(model.trainable_variables))
        capture()
    saved = [np.array(v) for v in swag.m2s + swag.deviations + swag.averages]
    kernel = model.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    if policy == "skip":
        capture()
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="SWAG capture refused"):
            capture()
    assert int(swag.n_averaged.numpy()) == 2
    for before, v in zip(saved, swag.m2s + swag.deviations + swag.averages):
        np.testing.assert_array_equal(before, np.array(v))
    np.testing.assert_allclose(_flat(swag.mean()), np.mean(recorded, axis=0), atol=1e-6)


def test_bad_arguments():
    model = _dense_model()
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=f"Received: max_rank={bad!r}"):
            SWAG(model, max_rank=bad)
    swag = SWAG(model, max_rank=3)
    with pytest.raises(ValueError, match="n_averaged=0"):
        swag.sample()
    swag.update()
    with pytest.raises(ValueError, match="cov=True with n_averaged=1"):
        swag.sample_vector()
    swag.sample_vector(cov=False, seed=0)  # the diagonal part alone works after 1 capture
    swag.update()
    with pytest.raises(ValueError, match="Received: scale=-1"):
        swag.sample(scale=-1)
    with pytest.raises(ValueError, match="Received: scale=nan"):
        swag.sample(scale=float("nan"))
    with pytest.raises(ValueError, match="diag=False, cov=False"):
        swag.sample(diag=False, cov=False)
    with pytest.raises(ValueError, match="Received: seed='a'"):
        swag.sample(seed="a")
    with pytest.raises(ValueError, match="Received: num_samples=0"):
        swag.predict(np.ones((1, 4), "float32"), num_samples=0)
    bn_model = _bn_classifier()
    bn_swag = SWAG(bn_model, max_rank=2)
    bn_swag.update()
    bn_swag.update()
    with pytest.raises(ValueError, match="Received: bn_data=None"):
        bn_swag.predict(np.ones((1, 4), "float32"), num_samples=1)
    variables_only = SWAG(model.trainable_variables, max_rank=2)
    variables_only.update()
    with pytest.raises(ValueError, match="list of variables"):
        variables_only.predict(np.ones((1, 4), "float32"), num_samples=1, cov=False)


@pytest.mark.parametrize("cls", [AveragedWeights, SWAG])
def test_swap_without_with_warns_and_changes_nothing(cls):
    # tensorflow-addons' `swap_weights()` swapped when called; `swap()` only swaps in a block.
    model = _dense_model()
    state = cls(model)
    rng = np.random.default_rng(11)
    captures = _capture(model, state, rng, 3)
    before = [np.array(v.numpy()) for v in model.trainable_variables]

    def forgot():
        state.swap()  # a call on its own line, as `swap_weights()` was used

    with pytest.warns(RuntimeWarning, match=r"swap\(\)` swapped nothing.*with .*assign_to"):
        forgot()
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v.numpy()))
    # Used as meant, it swaps in numpy's mean of the captures, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with state.swap():
            inside = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
    np.testing.assert_allclose(inside, captures.mean(axis=0), rtol=1e-6, atol=1e-6)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v.numpy()))
