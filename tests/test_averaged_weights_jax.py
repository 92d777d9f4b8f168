"""`keras_swa.AveragedWeights` on the JAX backend, checked against numpy over recorded weights.

Runs with `KERAS_BACKEND=jax` (the JAX pass of scripts/test.sh); skipped on other backends.
"""

import numpy as np
import pytest

from keras_swa import backend
from keras_swa.averaged_weights import AveragedWeights
from keras_swa.backend import keras

pytestmark = pytest.mark.jax_only

if backend.backend_name() == "jax":
    import jax
    import jax.numpy as jnp


def _model(dtype=None):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, dtype=dtype),
            keras.layers.BatchNormalization(dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


def _perturb(variables, rng, scale=1.0):
    for v in variables:
        current = np.asarray(v.numpy(), np.float32)
        v.assign((current + scale * rng.normal(size=v.shape)).astype(np.float32))


def _snapshot(variables):
    # bf16/fp16 values are exactly representable in float64.
    return [np.asarray(v.numpy()).astype(np.float64) for v in variables]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_swa_average_equals_numpy_mean_of_recorded_weights(dtype):
    model = _model(dtype)
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(0)
    recorded = []
    for _ in range(6):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        assert averaged.update() is True
    assert int(averaged.n_averaged.numpy()) == 6
    for i, average in enumerate(averaged.averages):
        assert average.dtype == jnp.float32  # fp32 whatever the variables' dtype
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(np.asarray(average), expected, rtol=1e-6, atol=2e-6)


def test_first_update_copies_exactly():
    model = _model()
    averaged = AveragedWeights(model)
    averaged.update()
    for average, v in zip(averaged.averages, model.trainable_variables):
        np.testing.assert_array_equal(np.asarray(average), v.numpy())


def test_ema_matches_numpy_ema():
    model = _model()
    averaged = AveragedWeights(model, mode="ema", decay=0.75)
    rng = np.random.default_rng(1)
    expected = None
    for _ in range(5):
        _perturb(model.trainable_variables, rng)
        values = _snapshot(model.trainable_variables)
        expected = values if expected is None else [
            0.75 * e + 0.25 * v for e, v in zip(expected, values)
        ]
        averaged.update()
    for average, e in zip(averaged.averages, expected):
        np.testing.assert_allclose(np.asarray(average), e, rtol=1e-5, atol=1e-6)


def test_one_compiled_update_in_place_that_never_retraces():
    model = _model()
    averaged = AveragedWeights(model)
    state = averaged._jax
    rng = np.random.default_rng(2)
    averaged.update()
    before = [a.value for a in state.storage]
    for _ in range(4):
        _perturb(model.trainable_variables, rng)
        averaged.update()
    with averaged.swap():
        pass
    averaged.assign_to(model)
    averaged.reset()
    averaged.update()
    assert state.traces == 1
    # The averages' buffers were donated to the compiled update, which wrote the new averages
    # in their place: the arrays read before an update are gone after it.
    assert all(array.is_deleted() for array in before)
    # One program: the update of every average is in one lowered module.
    lowered = state._update.lower(
        [a.value for a in state.storage],
        state.count.value,
        [v.value for v in model.trainable_variables],
    )
    assert "stablehlo" in lowered.as_text() or "mhlo" in lowered.as_text()


def test_update_reads_the_weights_at_each_call_during_fit():
    """Captures from a callback in `fit` see the weights of that moment (no stale arrays)."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    averaged = AveragedWeights(model)
    recorded = []

    class Capture(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            recorded.append(_snapshot(self.model.trainable_variables))
            averaged.update()

    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[Capture()])
    assert len(recorded) == 4
    assert not np.allclose(recorded[0][0], recorded[-1][0])  # the weights did move
    for i, average in enumerate(averaged.averages):
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(np.asarray(average), expected, rtol=1e-6, atol=1e-6)


def test_assign_to_casts_and_swap_restores_bit_for_bit():
    model = _model("bfloat16")
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(4)
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        averaged.update()
    _perturb(model.trainable_variables, rng)
    original = [np.asarray(v.numpy()).copy() for v in model.trainable_variables]
    with averaged.swap():
        for v, a in zip(model.trainable_variables, averaged.averages):
            assert v.dtype == "bfloat16"
            np.testing.assert_array_equal(
                np.asarray(v.numpy()), np.asarray(a).astype(jnp.bfloat16)
            )
    for o, v in zip(original, model.trainable_variables):
        np.testing.assert_array_equal(o, np.asarray(v.numpy()))
    with pytest.raises(RuntimeError, match="boom"):
        with averaged.swap():
            raise RuntimeError("boom")
    for o, v in zip(original, model.trainable_variables):
        np.testing.assert_array_equal(o, np.asarray(v.numpy()))
    other = _model("bfloat16")
    averaged.assign_to(other)
    for v, a in zip(other.trainable_variables, averaged.averages):
        np.testing.assert_array_equal(np.asarray(v.numpy()), np.asarray(a).astype(jnp.bfloat16))


def test_reset_starts_a_new_average():
    v = keras.Variable(np.array([1.0, 2.0], np.float32))
    averaged = AveragedWeights([v])
    averaged.update()
    v.assign(np.array([3.0, 6.0], np.float32))
    averaged.update()
    np.testing.assert_array_equal(np.asarray(averaged.averages[0]), [2.0, 4.0])
    averaged.reset()
    assert int(averaged.n_averaged.numpy()) == 0
    with pytest.raises(ValueError, match="n_averaged=0"):
        averaged.assign_to()
    v.assign(np.array([5.0, -1.0], np.float32))
    averaged.update()
    np.testing.assert_array_equal(np.asarray(averaged.averages[0]), [5.0, -1.0])


def test_count_dtype_and_overflow_is_refused():
    v = keras.Variable(np.array([1.0], np.float32))
    averaged = AveragedWeights([v])
    expected = "int64" if jax.config.jax_enable_x64 else "int32"
    assert averaged.n_averaged.dtype == expected
    averaged.update()
    limit = np.iinfo(expected).max
    averaged.n_averaged.assign(np.array(limit, expected))
    v.assign(np.array([100.0], np.float32))
    with pytest.raises(OverflowError, match=str(limit)):
        averaged.update()
    assert int(averaged.n_averaged.numpy()) == limit
    np.testing.assert_array_equal(np.asarray(averaged.averages[0]), [1.0])


def _poisoned_model(value):
    model = _model()
    averaged = {
        policy: AveragedWeights(model, nonfinite=policy) for policy in ("raise", "skip", "ignore")
    }
    rng = np.random.default_rng(5)
    for _ in range(2):
        _perturb(model.trainable_variables, rng)
        for a in averaged.values():
            a.update()
    kernel = model.layers[-1].kernel
    poisoned = np.asarray(kernel.numpy()).copy()
    poisoned[1, 2] = value
    kernel.assign(poisoned)
    return model, averaged


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_raise_and_skip_keep_the_averages_bit_identical(value):
    model, averaged = _poisoned_model(value)
    for policy in ("raise", "skip"):
        a = averaged[policy]
        before = [np.asarray(x).copy() for x in a.averages]
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=model.layers[-1].kernel.path):
                a.update()
        else:
            with pytest.warns(UserWarning, match="skipped"):
                assert a.update() is False
        assert int(a.n_averaged.numpy()) == 2
        for b, x in zip(before, a.averages):
            np.testing.assert_array_equal(b, np.asarray(x))
    ignored = averaged["ignore"]
    assert ignored.update() is True
    assert int(ignored.n_averaged.numpy()) == 3
    assert not np.isfinite(np.asarray(ignored.averages[-2])).all()


def test_finite_weights_whose_sum_overflows_are_folded_in():
    big = np.float32(3e38)
    a = keras.Variable(np.full([64], big, np.float32))
    b = keras.Variable(np.array([1.0], np.float32))
    averaged = AveragedWeights([a, b])
    assert averaged.update() is True
    assert int(averaged.n_averaged.numpy()) == 1
    np.testing.assert_array_equal(np.asarray(averaged.averages[0]), np.full([64], big))


def test_int_variables_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        AveragedWeights([keras.Variable(np.array([1, 2], np.int32))])


def test_averages_and_model_never_share_a_buffer():
    """After `assign_to`, a train step (donating the model's arrays) and an update (donating
    the averages') must leave both intact."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    averaged.update()
    first = _snapshot(model.trainable_variables)
    averaged.assign_to(model)
    held = averaged.averages
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    second = _snapshot(model.trainable_variables)
    averaged.update()
    for i, average in enumerate(averaged.averages):
        np.testing.assert_allclose(
            np.asarray(average), (first[i] + second[i]) / 2, rtol=1e-6, atol=1e-6
        )
        np.testing.assert_array_equal(np.asarray(held[i]), first[i])  # a snapshot stays one
    model.predict(x, verbose=0)  # the model's arrays are alive after the update
    np.testing.assert_array_equal(_snapshot(model.trainable_variables)[0], second[0])


def test_update_inside_a_batch_hook_syncs_the_model():
    """A batch hook that uses the model object directly (not `Callback.model`) still captures
    the weights of that step: the update syncs fit's state into the variables first."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    averaged = AveragedWeights(model)
    recorded = []

    class Capture(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            averaged.update()  # before anything reads `self.model`
            recorded.append(_snapshot(self.model.trainable_variables))

    rng = np.random.default_rng(8)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[Capture()])
    assert len(recorded) == 4
    for i, average in enumerate(averaged.averages):
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(np.asarray(average), expected, rtol=1e-6, atol=1e-6)


def _numpy_ema(snapshots, decay_of_n):
    expected = snapshots[0]
    for n, snap in enumerate(snapshots[1:], start=1):
        d = decay_of_n(n)
        expected = [d * e + (1 - d) * s for e, s in zip(expected, snap)]
    return expected


@pytest.mark.parametrize(
    "kwargs, decay_of_n",
    [
        ({"dynamic_decay": True}, lambda n: min(0.999, (1 + n) / (10 + n))),
        ({"warmup_power": 0.75, "warmup_gamma": 2.0},
         lambda n: min(0.999, 1 - (1 + n / 2.0) ** -0.75)),
    ],
)
def test_ema_warmup_matches_numpy_and_traces_once(kwargs, decay_of_n):
    model = _model()
    averaged = AveragedWeights(model, mode="ema", decay=0.999, **kwargs)
    rng = np.random.default_rng(10)
    recorded = []
    for _ in range(7):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    for average, e in zip(averaged.averages, _numpy_ema(recorded, decay_of_n)):
        np.testing.assert_allclose(np.asarray(average), e, rtol=1e-5, atol=1e-5)
    assert averaged._jax.traces == 1


@pytest.mark.parametrize("how", ["avg_fn", "multi_avg_fn"])
def test_custom_avg_fn_matches_numpy_and_traces_once(how):
    ops = keras.ops
    seen_n = []

    def late_heavy(average, value, n_averaged):
        seen_n.append(n_averaged)
        return average + (value - average) * (2.0 / (ops.cast(n_averaged, "float32") + 2.0))

    def multi(averages, values, n_averaged):
        return [late_heavy(a, v, n_averaged) for a, v in zip(averages, values)]

    model = _model()
    kwargs = {"avg_fn": late_heavy} if how == "avg_fn" else {"multi_avg_fn": multi}
    averaged = AveragedWeights(model, **kwargs)
    rng = np.random.default_rng(11)
    recorded = []
    for _ in range(6):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    expected = recorded[0]
    for n, snap in enumerate(recorded[1:], start=1):
        expected = [e + (s - e) * (2.0 / (n + 2.0)) for e, s in zip(expected, snap)]
    for average, e in zip(averaged.averages, expected):
        np.testing.assert_allclose(np.asarray(average), e, rtol=1e-5, atol=1e-5)
    assert averaged._jax.traces == 1
    assert len(seen_n) == len(model.trainable_variables)
    assert all(np.shape(n) == () for n in seen_n)


def test_running_max_avg_fn():
    model = _model()
    averaged = AveragedWeights(model, avg_fn=lambda a, v, n: keras.ops.maximum(a, v))
    rng = np.random.default_rng(12)
    recorded = []
    for _ in range(5):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    for i, average in enumerate(averaged.averages):
        np.testing.assert_allclose(
            np.asarray(average), np.max([r[i] for r in recorded], axis=0), rtol=1e-7
        )


def test_save_load_then_continue_matches_numpy(tmp_path):
    model = _model()
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(13)
    recorded = []
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    path = tmp_path / "swa.weights.h5"
    averaged.save_weights(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swa.weights.h5"]
    fresh = _model()
    restored = AveragedWeights(fresh)
    restored.load_weights(path)
    assert int(restored.n_averaged.numpy()) == 3
    for _ in range(3):
        _perturb(fresh.trainable_variables, rng)
        recorded.append(_snapshot(fresh.trainable_variables))
        restored.update()
    assert restored._jax.traces == 1
    for i, average in enumerate(restored.averages):
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(np.asarray(average), expected, rtol=1e-6, atol=1e-6)


def test_refused_load_leaves_the_state(tmp_path):
    source = AveragedWeights(_model())
    source.update()
    path = str(tmp_path / "swa.weights.h5")
    source.save_weights(path)
    for target, message in [
        (AveragedWeights(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])),
         "of 6 variables, this AveragedWeights tracks 2"),
        (AveragedWeights(_model(), mode="ema", decay=0.9), "'swa' rule"),
    ]:
        target.update()
        before = [np.asarray(a).copy() for a in target.averages]
        with pytest.raises(ValueError, match=message):
            target.load_weights(path)
        assert int(target.n_averaged.numpy()) == 1
        for b, a in zip(before, target.averages):
            np.testing.assert_array_equal(b, np.asarray(a))
    store = {}
    source.save_own_variables(store)
    store["n_averaged"] = np.asarray(2**40, np.int64)
    if not jax.config.jax_enable_x64:  # an int32 count cannot hold it
        with pytest.raises(ValueError, match="n_averaged=array"):
            AveragedWeights(_model()).load_own_variables(store)


def test_a_model_parallel_distribution_is_refused():
    # DataParallel runs (tests/test_data_parallel.py, on 2 devices); other layouts are untested.
    model = _model()
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices=jax.devices()[:1])
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh))
    )
    try:
        with pytest.raises(NotImplementedError, match="Received: distribution=ModelParallel"):
            AveragedWeights(model)
    finally:
        keras.distribution.set_distribution(None)
