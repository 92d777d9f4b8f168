"""`keras_swa.SWAG` on the JAX backend: the compiled update, the draws, captures during `fit`.

Runs with `KERAS_BACKEND=jax` (the JAX pass of scripts/test.sh); skipped on other backends. The
backend-neutral statistics, sampling and prediction tests are in tests/test_swag.py, which the
JAX pass runs too.
"""

import numpy as np
import pytest

from keras_swa import backend
from keras_swa.backend import keras
from keras_swa.swag import SWAG

pytestmark = pytest.mark.jax_only

if backend.backend_name() == "jax":
    import jax
    import jax.numpy as jnp


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(3, activation="softmax")]
    )


def _capture(model, swag, rng, count):
    """Random weights `count` times, `update()` each; returns the captures (float64, per var)."""
    captures = []
    for _ in range(count):
        for v in model.trainable_variables:
            v.assign(rng.normal(size=v.shape).astype("float32"))
        captures.append([np.asarray(v.numpy(), np.float64) for v in model.trainable_variables])
        assert swag.update() is True
    return captures


def _np_statistics(captures, k):
    """Per variable: mean, population variance, and the last k columns w_i - mean(w_1..w_i)."""
    out = []
    for i in range(len(captures[0])):
        w = np.stack([c[i] for c in captures])
        counts = np.arange(1, len(w) + 1).reshape((-1,) + (1,) * (w.ndim - 1))
        running = np.cumsum(w, axis=0) / counts
        out.append((w.mean(0), w.var(0), (w - running)[-k:]))
    return out


def test_one_compiled_update_in_place_that_never_retraces():
    model = _model()
    swag = SWAG(model, max_rank=3)
    state = swag._jax
    _capture(model, swag, np.random.default_rng(0), 2)
    before = [v.value for v in state.means + state.m2s + state.deviations] + [state.count.value]
    _capture(model, swag, np.random.default_rng(1), 5)
    assert state.traces == 1
    # The statistics' buffers were donated to the compiled update: written in place.
    assert all(array.is_deleted() for array in before)
    assert swag.n_averaged.dtype == ("int64" if jax.config.jax_enable_x64 else "int32")
    assert int(swag.n_averaged.numpy()) == 7 and swag.rank == 3


def test_statistics_match_numpy_after_the_ring_buffer_wraps():
    model = _model()
    swag = SWAG(model, max_rank=3)
    captures = _capture(model, swag, np.random.default_rng(3), 8)
    expected = _np_statistics(captures, 3)
    for (mean, var, cols), m, v, d in zip(
        expected, swag.mean(), swag.variances(), swag.deviation_columns()
    ):
        assert m.dtype == jnp.float32 and v.dtype == jnp.float32 and d.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(m), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v), var, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(d), cols, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("diag,cov", [(True, True), (True, False), (False, True)])
def test_draw_is_the_swag_formula_with_jax_random_noise(diag, cov):
    model = _model()
    k = 4
    swag = SWAG(model, max_rank=k)
    captures = _capture(model, swag, np.random.default_rng(4), 6)
    scale, seed = 0.3, 17
    # The noise, as keras_swa.backends.jax_swag documents it, and the formula in numpy.
    key = jax.random.key(seed)
    n_vars = len(captures[0])
    z2 = np.asarray(jax.random.normal(jax.random.fold_in(key, n_vars), (k,), jnp.float32),
                    np.float64)
    draw = swag.sample_vector(scale=scale, diag=diag, cov=cov, seed=seed)
    for i, ((mean, var, cols), got) in enumerate(zip(_np_statistics(captures, k), draw)):
        noise = np.zeros_like(mean)
        if diag:
            z1 = jax.random.normal(jax.random.fold_in(key, i), mean.shape, jnp.float32)
            noise += np.sqrt(var) * np.asarray(z1, np.float64)
        if cov:
            # The ring buffer's column order does not matter: z2 pairs with slot n % K.
            slots = [(j % k) for j in range(len(captures) - k, len(captures))]
            ordered = np.zeros_like(cols)
            ordered[slots] = cols
            noise += np.tensordot(z2, ordered, axes=[[0], [0]]) / np.sqrt(k - 1)
        np.testing.assert_allclose(np.asarray(got), mean + np.sqrt(scale) * noise,
                                   rtol=1e-4, atol=1e-5)
    # Same seed, same draw; the draw is traced once per (diag, cov).
    again = swag.sample_vector(scale=scale, diag=diag, cov=cov, seed=seed)
    for a, b in zip(draw, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_refused_capture_leaves_the_state_bit_for_bit(policy):
    model = _model()
    swag = SWAG(model, max_rank=2, nonfinite=policy)
    state = swag._jax
    _capture(model, swag, np.random.default_rng(5), 3)
    saved = [np.array(v.numpy()) for v in state.means + state.m2s + state.deviations]
    kernel = model.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.inf, "float32"))
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="n_averaged=3"):
            swag.update()
    else:
        with pytest.warns(UserWarning, match="skipped"):
            assert swag.update() is False
    assert int(swag.n_averaged.numpy()) == 3
    for before, v in zip(saved, state.means + state.m2s + state.deviations):
        np.testing.assert_array_equal(before, np.asarray(v.numpy()))
    assert state.traces == 1  # the refusal ran in the same compiled update


def test_ignore_folds_a_nonfinite_capture_in():
    model = _model()
    swag = SWAG(model, max_rank=2, nonfinite="ignore")
    _capture(model, swag, np.random.default_rng(6), 2)
    kernel = model.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    assert swag.update() is True
    assert int(swag.n_averaged.numpy()) == 3
    assert np.isnan(np.asarray(swag.mean()[0])).all()


def test_captures_during_fit_match_the_recorded_weights():
    # During `fit` on JAX the trainer holds the state outside the variables and donates the
    # weights' buffers at every step: the captures must see the synced weights.
    model = _model()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    swag = SWAG(model, max_rank=2)
    recorded = []

    def capture(epoch, logs):
        swag.update()
        recorded.append([np.asarray(w, np.float64) for w in model.get_weights()])

    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=capture)])
    assert int(swag.n_averaged.numpy()) == 3
    stats = _np_statistics(recorded, 2)
    for (mean, var, cols), m, v, d in zip(
        stats, swag.mean(), swag.variances(), swag.deviation_columns()
    ):
        np.testing.assert_allclose(np.asarray(m), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v), var, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(np.asarray(d), cols, rtol=1e-4, atol=1e-6)
    # The model keeps training after a draw was written into it and its weights restored.
    before = [np.array(w) for w in model.get_weights()]
    probs = swag.predict(x[:4], num_samples=2, seed=0)
    assert probs.shape == (4, 3)
    for b, w in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, w)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with swag.swap():
        np.testing.assert_allclose(np.asarray(model.trainable_variables[0].numpy()),
                                   stats[0][0], atol=1e-6)


def test_a_model_parallel_distribution_is_refused_by_name():
    # DataParallel runs (tests/test_data_parallel.py, on 2 devices); sharded variables are
    # untested: refused, never a silently wrong number.
    from keras_swa.fge import FGE

    model = _model()
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices=jax.devices()[:1])
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh))
    )
    try:
        for make, name in ((lambda: SWAG(model), "SWAG"), (lambda: FGE(model), "FGE")):
            with pytest.raises(
                NotImplementedError,
                match=f"keras_swa.{name} .*Received: distribution=ModelParallel",
            ):
                make()
    finally:
        keras.distribution.set_distribution(None)
