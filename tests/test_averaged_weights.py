"""Tests for `keras_swa.AveragedWeights`, checked against numpy over recorded weights."""

import numpy as np
import pytest
import tensorflow as tf

from keras_swa.averaged_weights import AveragedWeights
from keras_swa.backend import keras


def _model():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )


def _wide_model():
    """Two kernels of >= 16,384 floats (averages of their own) and small variables (packed)."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4096),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(5),
        ]
    )


def _perturb(variables, rng):
    for v in variables:
        v.assign(v.numpy() + rng.normal(size=v.shape).astype(v.numpy().dtype))


def _snapshot(variables):
    return [v.numpy().astype(np.float64) for v in variables]


@pytest.mark.parametrize("make_model", [_model, _wide_model])
def test_update_equals_numpy_mean_of_recorded_weights(make_model):
    model = make_model()
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(0)
    recorded = []
    for _ in range(7):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    assert int(averaged.n_averaged.numpy()) == 7
    for i, average in enumerate(averaged.averages):
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(average.numpy(), expected, rtol=1e-6, atol=1e-6)
        assert average.dtype == tf.float32


@pytest.mark.parametrize("make_model", [_model, _wide_model])
def test_first_update_copies_exactly(make_model):
    model = make_model()
    averaged = AveragedWeights(model)
    averaged.update()
    for average, v in zip(averaged.averages, model.trainable_variables):
        np.testing.assert_array_equal(average.numpy(), v.numpy())


def test_update_is_one_compiled_call_that_never_retraces():
    model = _model()
    averaged = AveragedWeights(model)
    for _ in range(5):
        averaged.update()
    assert averaged._state.update_fn.experimental_get_tracing_count() == 1
    # The update is XLA-compiled: the compiler IR exists and updates every average.
    hlo = averaged._state.update_fn.experimental_get_compiler_ir()(stage="hlo")
    assert "HloModule" in hlo


def test_update_inside_tf_function():
    model = _model()
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(1)

    @tf.function
    def capture():
        averaged.update()

    recorded = []
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        capture()
    expected = np.mean([r[0] for r in recorded], axis=0)
    np.testing.assert_allclose(averaged.averages[0].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_ema_mode_matches_numpy_ema():
    model = _model()
    decay = 0.9
    averaged = AveragedWeights(model, mode="ema", decay=decay)
    rng = np.random.default_rng(2)
    expected = None
    for _ in range(6):
        _perturb(model.trainable_variables, rng)
        snap = _snapshot(model.trainable_variables)
        expected = snap if expected is None else [
            decay * e + (1 - decay) * s for e, s in zip(expected, snap)
        ]
        averaged.update()
    for average, e in zip(averaged.averages, expected):
        np.testing.assert_allclose(average.numpy(), e, rtol=1e-5, atol=1e-6)


def test_non_trainable_excluded_by_default_and_included_on_request():
    model = _model()
    default = AveragedWeights(model)
    assert len(default.averages) == len(model.trainable_variables)
    tracked_ids = {id(v) for v in default.tracked_variables}
    for v in model.non_trainable_variables:
        assert id(v) not in tracked_ids
    everything = AveragedWeights(model, include_non_trainable=True)
    assert len(everything.averages) == len(model.variables)


def test_list_of_tf_variables():
    a = tf.Variable([1.0, 2.0])
    b = tf.Variable([[3.0]])
    averaged = AveragedWeights([a, b])
    averaged.update()
    a.assign([3.0, 6.0])
    b.assign([[5.0]])
    averaged.update()
    np.testing.assert_allclose(averaged.averages[0].numpy(), [2.0, 4.0])
    np.testing.assert_allclose(averaged.averages[1].numpy(), [[4.0]])


def test_assign_to_and_to_another_model():
    model = _model()
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(3)
    recorded = []
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    other = _model()
    averaged.assign_to(other)
    for i, v in enumerate(other.trainable_variables):
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-6)
    averaged.assign_to()
    for v, w in zip(model.trainable_variables, other.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), w.numpy())


def test_assign_to_mismatched_model_raises_and_leaves_it_untouched():
    model = _model()
    averaged = AveragedWeights(model)
    averaged.update()
    wrong_shape = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
         keras.layers.Dense(3)]
    )
    before = _snapshot(wrong_shape.variables)
    with pytest.raises(ValueError, match="shape"):
        averaged.assign_to(wrong_shape)
    for b, v in zip(before, wrong_shape.variables):
        np.testing.assert_array_equal(b, v.numpy())
    wrong_count = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="expected 6 variables, the model has 2"):
        averaged.assign_to(wrong_count)


def test_swap_restores_original_weights_exactly_even_on_error():
    model = _model()
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(4)
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        averaged.update()
    _perturb(model.trainable_variables, rng)
    original = [v.numpy().copy() for v in model.trainable_variables]
    with averaged.swap():
        for v, a in zip(model.trainable_variables, averaged.averages):
            np.testing.assert_array_equal(v.numpy(), a.numpy())
    for o, v in zip(original, model.trainable_variables):
        np.testing.assert_array_equal(o, v.numpy())
    with pytest.raises(RuntimeError, match="boom"):
        with averaged.swap():
            raise RuntimeError("boom")
    for o, v in zip(original, model.trainable_variables):
        np.testing.assert_array_equal(o, v.numpy())


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(5)
    for _ in range(4):
        _perturb(model.trainable_variables, rng)
        averaged.update()
    path = tf.train.Checkpoint(swa=averaged).save(str(tmp_path / "ckpt"))
    saved = [a.numpy().copy() for a in averaged.averages]

    restored = AveragedWeights(model)
    tf.train.Checkpoint(swa=restored).restore(path).assert_existing_objects_matched()
    assert int(restored.n_averaged.numpy()) == 4
    for s, a in zip(saved, restored.averages):
        np.testing.assert_array_equal(s, a.numpy())
    # The checkpoint holds the averages and the count, not the model's own weights.
    names = [name for name, _ in tf.train.list_variables(path)]
    assert not any("kernel" in n or "moving" in n for n in names), names


def test_bf16_variables_are_averaged_in_fp32():
    rng = np.random.default_rng(6)
    v = tf.Variable(tf.zeros([256], tf.bfloat16))
    averaged = AveragedWeights([v])
    total = np.zeros([256], np.float64)
    n = 1000
    for _ in range(n):
        value = tf.cast(rng.normal(loc=3.0, size=256).astype(np.float32), tf.bfloat16)
        v.assign(value)
        total += value.numpy().astype(np.float64)
        averaged.update()
    mean64 = total / n
    assert averaged.averages[0].dtype == tf.float32
    err = np.abs(averaged.averages[0].numpy().astype(np.float64) - mean64).max()
    # Within fp32 rounding of the float64 mean (a bf16 accumulator would be off by ~1e-2).
    assert err < 1e-5, err
    averaged.assign_to()
    assert v.dtype == tf.bfloat16
    np.testing.assert_array_equal(
        v.numpy(), tf.cast(averaged.averages[0], tf.bfloat16).numpy()
    )


def test_reset_starts_a_new_average():
    v = tf.Variable([1.0])
    averaged = AveragedWeights([v])
    averaged.update()
    averaged.reset()
    v.assign([5.0])
    averaged.update()
    np.testing.assert_array_equal(averaged.averages[0].numpy(), [5.0])
    assert int(averaged.n_averaged.numpy()) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "mean"}, "mode='mean'"),
        ({"mode": "ema"}, "decay=None"),
        ({"mode": "ema", "decay": 1.0}, "decay=1.0"),
        ({"mode": "ema", "decay": -0.1}, "decay=-0.1"),
        ({"decay": 0.9}, "decay=0.9"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AveragedWeights(_model(), **kwargs)


def test_unbuilt_model_and_bad_variables_raise():
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="must be built"):
        AveragedWeights(unbuilt)
    with pytest.raises(ValueError, match="no variables"):
        AveragedWeights([])
    with pytest.raises(TypeError, match="Received an element of type ndarray"):
        AveragedWeights([np.zeros(3)])
    with pytest.raises(TypeError, match="int32"):
        AveragedWeights([tf.Variable([1, 2])])
    with pytest.raises(TypeError, match="Received: model_or_variables=3"):
        AveragedWeights(3)


def test_writing_before_any_capture_raises():
    averaged = AveragedWeights(_model())
    with pytest.raises(ValueError, match="n_averaged=0"):
        averaged.assign_to()
    with pytest.raises(ValueError, match="n_averaged=0"):
        with averaged.swap():
            pass


def _diverged_model():
    model = _model()
    averaged_raise = AveragedWeights(model)
    averaged_skip = AveragedWeights(model, nonfinite="skip")
    averaged_raise.update()
    averaged_skip.update()
    kernel = model.layers[-1].kernel
    good = [a.numpy().copy() for a in averaged_raise.averages]
    value = kernel.numpy()
    value[0, 0] = np.nan
    kernel.assign(value)
    return model, averaged_raise, averaged_skip, good


def test_nonfinite_capture_raises_naming_the_variable_and_keeps_the_average():
    model, averaged, _, good = _diverged_model()
    with pytest.raises(FloatingPointError, match="kernel"):
        averaged.update()
    assert int(averaged.n_averaged.numpy()) == 1
    for g, a in zip(good, averaged.averages):
        np.testing.assert_array_equal(g, a.numpy())


def test_nonfinite_capture_skipped_with_warning():
    model, _, averaged, good = _diverged_model()
    with pytest.warns(UserWarning, match="capture is skipped"):
        assert averaged.update() is False
    assert int(averaged.n_averaged.numpy()) == 1
    for g, a in zip(good, averaged.averages):
        np.testing.assert_array_equal(g, a.numpy())
    assert np.isfinite(averaged.averages[-2].numpy()).all()


def test_nonfinite_skip_inside_tf_function():
    model, _, averaged, good = _diverged_model()

    @tf.function
    def capture():
        averaged.update()

    capture()
    assert int(averaged.n_averaged.numpy()) == 1
    for g, a in zip(good, averaged.averages):
        np.testing.assert_array_equal(g, a.numpy())


def test_nonfinite_ignore_folds_it_in():
    model = _model()
    averaged = AveragedWeights(model, nonfinite="ignore")
    model.layers[-1].kernel.assign(np.full(model.layers[-1].kernel.shape, np.inf, "float32"))
    averaged.update()
    assert not np.isfinite(averaged.averages[-2].numpy()).all()


def test_bad_nonfinite_policy():
    with pytest.raises(ValueError, match="nonfinite='warn'"):
        AveragedWeights(_model(), nonfinite="warn")


# Shapes that take each path of the storage (keras_swa.packing) and so of the NaN/Inf test
# (keras_swa.backends.tensorflow_finite_check, a sum per stored tensor): large tensors with
# averages of their own, and two small ones whose values are packed into one flat average.
_PROBE_SHAPES = [(256, 272), (65537,), (3,), (7, 2)]


def test_any_single_nonfinite_value_is_caught():
    rng = np.random.default_rng(3)
    values = [rng.normal(size=s).astype("float32") for s in _PROBE_SHAPES]
    variables = [tf.Variable(v) for v in values]
    averaged = AveragedWeights(variables, nonfinite="skip")  # one compiled update for all cases
    assert averaged.update() is True
    for which, value in enumerate(values):
        for index in (0, value.size // 2, value.size - 1):  # first, middle, last (a tail)
            for bad in (np.nan, np.inf, -np.inf):
                poisoned = value.copy()
                poisoned.reshape(-1)[index] = bad
                variables[which].assign(poisoned)
                with pytest.warns(UserWarning, match=f"1 of {len(values)} variables"):
                    assert averaged.update() is False, (which, index, bad)
                variables[which].assign(value)
    assert int(averaged.n_averaged.numpy()) == 1
    for v, a in zip(values, averaged.averages):
        np.testing.assert_array_equal(a.numpy(), v)  # bit-identical: untouched
    # Finite weights are folded in again: the mean of the two finite captures.
    repaired = [v + 1.0 for v in values]
    for variable, value in zip(variables, repaired):
        variable.assign(value)
    assert averaged.update() is True
    for v, r, a in zip(values, repaired, averaged.averages):
        np.testing.assert_allclose(
            a.numpy(), (v.astype(np.float64) + r) / 2, rtol=1e-6, atol=1e-6
        )


def test_small_averages_share_one_variable_and_checkpoint_with_the_large_ones(tmp_path):
    model = _wide_model()
    averaged = AveragedWeights(model)
    large = [v for v in model.trainable_variables if np.prod(v.shape) >= 16384]
    assert len(large) == 2  # the 4 x 4096 and 4096 x 5 kernels
    # An average per large variable, one flat average of the 4 small ones, the count.
    assert len(averaged.variables) == len(large) + 2
    rng = np.random.default_rng(7)
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        averaged.update()
    saved = [a.numpy().copy() for a in averaged.averages]
    path = tf.train.Checkpoint(swa=averaged).save(str(tmp_path / "ckpt"))
    restored = AveragedWeights(model)
    tf.train.Checkpoint(swa=restored).restore(path).assert_consumed()
    assert int(restored.n_averaged.numpy()) == 3
    for s, a, v in zip(saved, restored.averages, model.trainable_variables):
        assert a.shape == v.shape
        np.testing.assert_array_equal(s, a.numpy())


@pytest.mark.parametrize("in_tf_function", [False, True])
def test_finite_weights_whose_sum_overflows_are_folded_in(in_tf_function):
    # The fast NaN/Inf test is a sum, which overflows to inf for these finite weights; the
    # exact test behind it must then let the capture through.
    big = np.float32(3e38)
    large = tf.Variable(np.full([20000], big, np.float32))
    small = [tf.Variable([big, big]), tf.Variable([1.0])]
    averaged = AveragedWeights([large] + small)
    update = tf.function(averaged.update) if in_tf_function else averaged.update
    update()
    assert int(averaged.n_averaged.numpy()) == 1
    for a, v in zip(averaged.averages, [large] + small):
        np.testing.assert_array_equal(a.numpy(), v.numpy())


def test_nonfinite_bf16_variable_is_caught():
    variable = tf.Variable(tf.ones([16 * 4096], tf.bfloat16))
    averaged = AveragedWeights([variable])
    averaged.update()
    variable.assign(tf.tensor_scatter_nd_update(variable, [[5]], tf.constant([np.inf], tf.bfloat16)))
    with pytest.raises(FloatingPointError, match="1 of 1 variables"):
        averaged.update()
    np.testing.assert_array_equal(averaged.averages[0].numpy(), np.ones(16 * 4096, "float32"))
    assert int(averaged.n_averaged.numpy()) == 1


def test_nonfinite_raise_inside_tf_function_fails_the_graph_and_keeps_the_average():
    model, averaged, _, good = _diverged_model()

    @tf.function
    def capture():
        averaged.update()

    with pytest.raises(tf.errors.InvalidArgumentError, match="SWA capture refused"):
        capture()
    assert int(averaged.n_averaged.numpy()) == 1
    for g, a in zip(good, averaged.averages):
        np.testing.assert_array_equal(g, a.numpy())


# ---------------------------------------------------------------- EMA warm-up (dynamic decay)


def _numpy_ema(snapshots, decay_of_n):
    """EMA over recorded snapshots; `decay_of_n(n)` for the update after n earlier ones."""
    expected = None
    for n, snap in enumerate(snapshots):
        if expected is None:
            expected = snap
        else:
            d = decay_of_n(n)
            expected = [d * e + (1 - d) * s for e, s in zip(expected, snap)]
    return expected


@pytest.mark.parametrize("make_model", [_model, _wide_model])
@pytest.mark.parametrize(
    "kwargs, decay_of_n",
    [
        # tfa MovingAverage(dynamic_decay=True): min(d, (1 + n) / (10 + n)), n updates so far.
        ({"dynamic_decay": True}, lambda n: min(0.999, (1 + n) / (10 + n))),
        # timm's warm-up: min(d, 1 - (1 + n / gamma) ** -power).
        ({"warmup_power": 0.75, "warmup_gamma": 2.0},
         lambda n: min(0.999, 1 - (1 + n / 2.0) ** -0.75)),
    ],
)
def test_ema_warmup_matches_numpy_and_traces_once(make_model, kwargs, decay_of_n):
    model = make_model()
    averaged = AveragedWeights(model, mode="ema", decay=0.999, **kwargs)
    rng = np.random.default_rng(8)
    recorded = []
    for _ in range(7):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    expected = _numpy_ema(recorded, decay_of_n)
    for average, e in zip(averaged.averages, expected):
        np.testing.assert_allclose(average.numpy(), e, rtol=1e-5, atol=1e-5)
    # The decay is computed from the count inside the one compiled update.
    assert averaged._state.update_fn.experimental_get_tracing_count() == 1


def test_dynamic_decay_reaches_the_constant_decay():
    v = tf.Variable([0.0])
    averaged = AveragedWeights([v], mode="ema", decay=0.5, dynamic_decay=True)
    averaged.update()  # n = 0: copies 0
    for n in range(1, 12):
        v.assign([1.0])
        averaged.update()
    # (1 + n) / (10 + n) >= 0.5 from n = 8: the decay is then capped at 0.5.
    expected = _numpy_ema([[np.zeros(1)]] + [[np.ones(1)]] * 11,
                          lambda n: min(0.5, (1 + n) / (10 + n)))
    np.testing.assert_allclose(averaged.averages[0].numpy(), expected[0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dynamic_decay": True}, "mode='swa', dynamic_decay=True"),
        ({"warmup_power": 0.5}, "warmup_power=0.5"),
        ({"mode": "ema", "decay": 0.9, "dynamic_decay": 1}, "dynamic_decay=1"),
        ({"mode": "ema", "decay": 0.9, "warmup_power": 0}, "warmup_power=0"),
        ({"mode": "ema", "decay": 0.9, "warmup_power": 1.0, "warmup_gamma": -1.0},
         "warmup_gamma=-1.0"),
        ({"mode": "ema", "decay": 0.9, "warmup_gamma": 2.0}, "warmup_gamma=2.0"),
        ({"mode": "ema", "decay": 0.9, "dynamic_decay": True, "warmup_power": 1.0},
         "not both"),
        ({"avg_fn": 3}, "avg_fn=3"),
        ({"multi_avg_fn": "mean"}, "multi_avg_fn='mean'"),
        ({"avg_fn": max, "multi_avg_fn": max}, "not both"),
        ({"avg_fn": max, "mode": "ema", "decay": 0.9}, "mode='ema', decay=0.9"),
    ],
)
def test_bad_rule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AveragedWeights(_model(), **kwargs)


# ---------------------------------------------------------------- custom avg_fn / multi_avg_fn


def _running_max(average, value, n_averaged):
    return tf.maximum(average, value)


def _late_heavy(average, value, n_averaged):
    # Weight 2 / (n + 2) on the new value: later captures count more than in SWA's mean.
    return average + (value - average) * (2.0 / (tf.cast(n_averaged, tf.float32) + 2.0))


def _numpy_late_heavy(snapshots):
    average = snapshots[0]
    for n, snap in enumerate(snapshots[1:], start=1):
        average = [a + (s - a) * (2.0 / (n + 2.0)) for a, s in zip(average, snap)]
    return average


@pytest.mark.parametrize("make_model", [_model, _wide_model])
@pytest.mark.parametrize("how", ["avg_fn", "multi_avg_fn"])
def test_custom_avg_fn_matches_numpy_and_traces_once(make_model, how):
    model = make_model()
    seen_n = []

    def late_heavy(average, value, n_averaged):
        seen_n.append(n_averaged)
        assert average.dtype == tf.float32 and value.dtype == tf.float32
        return _late_heavy(average, value, n_averaged)

    def multi(averages, values, n_averaged):
        return [late_heavy(a, v, n_averaged) for a, v in zip(averages, values)]

    kwargs = {"avg_fn": late_heavy} if how == "avg_fn" else {"multi_avg_fn": multi}
    averaged = AveragedWeights(model, **kwargs)
    # An arbitrary function may not be elementwise: one average per variable, none packed.
    assert len(averaged.variables) == len(model.trainable_variables) + 1
    rng = np.random.default_rng(9)
    recorded = []
    for _ in range(6):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    for average, e in zip(averaged.averages, _numpy_late_heavy(recorded)):
        np.testing.assert_allclose(average.numpy(), e, rtol=1e-5, atol=1e-5)
    # Called while tracing only (per variable), with the count as a scalar tensor.
    assert len(seen_n) == len(model.trainable_variables)
    assert all(tf.is_tensor(n) and n.shape == () for n in seen_n)
    assert averaged._state.update_fn.experimental_get_tracing_count() == 1


def test_running_max_avg_fn_and_first_update_copies():
    model = _model()
    averaged = AveragedWeights(model, avg_fn=_running_max)
    rng = np.random.default_rng(10)
    recorded = []
    for _ in range(5):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
        if len(recorded) == 1:
            for a, s in zip(averaged.averages, recorded[0]):
                np.testing.assert_allclose(a.numpy(), s, rtol=1e-7)
    for i, average in enumerate(averaged.averages):
        np.testing.assert_allclose(average.numpy(), np.max([r[i] for r in recorded], axis=0),
                                   rtol=1e-7)


def test_avg_fn_of_the_wrong_shape_raises():
    averaged = AveragedWeights(_model(), avg_fn=lambda a, v, n: tf.reduce_sum(a))
    with pytest.raises(ValueError, match="avg_fn` must return averages of the averages' shapes"):
        averaged.update()
    averaged = AveragedWeights(_model(), multi_avg_fn=lambda a, v, n: a[:1])
    with pytest.raises(ValueError, match="must return a list of 6 tensors"):
        averaged.update()


# ---------------------------------------------------------------- save_weights / load_weights


@pytest.mark.parametrize("make_model", [_model, _wide_model])
@pytest.mark.parametrize(
    "kwargs, numpy_rule",
    [
        ({}, "mean"),
        ({"mode": "ema", "decay": 0.999, "dynamic_decay": True}, "dynamic"),
    ],
)
def test_save_load_then_continue_matches_numpy(tmp_path, make_model, kwargs, numpy_rule):
    model = make_model()
    averaged = AveragedWeights(model, **kwargs)
    rng = np.random.default_rng(11)
    recorded = []
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        recorded.append(_snapshot(model.trainable_variables))
        averaged.update()
    path = tmp_path / "swa.weights.h5"
    averaged.save_weights(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swa.weights.h5"]  # no temporary left

    fresh = make_model()  # e.g. the restarted job: other initial weights
    restored = AveragedWeights(fresh, **kwargs)
    restored.load_weights(path)
    assert int(restored.n_averaged.numpy()) == 3
    for a, b in zip(averaged.averages, restored.averages):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for _ in range(3):
        _perturb(fresh.trainable_variables, rng)
        recorded.append(_snapshot(fresh.trainable_variables))
        restored.update()
    if numpy_rule == "mean":
        expected = [np.mean([r[i] for r in recorded], axis=0) for i in range(len(recorded[0]))]
    else:
        expected = _numpy_ema(recorded, lambda n: min(0.999, (1 + n) / (10 + n)))
    for average, e in zip(restored.averages, expected):
        np.testing.assert_allclose(average.numpy(), e, rtol=1e-5, atol=1e-5)


def test_store_protocol_keys_and_round_trip():
    model = _model()
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(12)
    _perturb(model.trainable_variables, rng)
    averaged.update()
    store = {}
    averaged.save_own_variables(store)
    n = len(model.trainable_variables)
    assert sorted(store) == sorted([str(i) for i in range(n)] + ["n_averaged", "fingerprint"])
    for i, v in enumerate(model.trainable_variables):
        assert store[str(i)].dtype == np.float32
        np.testing.assert_array_equal(store[str(i)], v.numpy())
    assert int(store["n_averaged"]) == 1
    restored = AveragedWeights(_model())
    restored.load_own_variables(store)
    for a, b in zip(averaged.averages, restored.averages):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _state(averaged):
    return [a.numpy().copy() for a in averaged.averages], int(averaged.n_averaged.numpy())


def _assert_state(averaged, state):
    averages, count = state
    assert int(averaged.n_averaged.numpy()) == count
    for a, b in zip(averages, averaged.averages):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize(
    "make_target, message",
    [
        (lambda: AveragedWeights(
            keras.Sequential([keras.Input((5,)), keras.layers.Dense(8),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3)])),
         r"Variable 0 .* has shape \(5, 8\) but its saved average has shape \(4, 8\)"),
        (lambda: AveragedWeights(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])),
         "of 6 variables, this AveragedWeights tracks 2"),
        (lambda: AveragedWeights(_model(), mode="ema", decay=0.9),
         "made by the 'swa' rule, this AveragedWeights uses 'ema'"),
        (lambda: AveragedWeights(_model(), avg_fn=_running_max),
         "made by the 'swa' rule, this AveragedWeights uses 'avg_fn'"),
    ],
)
def test_refused_load_names_the_difference_and_leaves_the_state(tmp_path, make_target, message):
    model = _model()
    source = AveragedWeights(model)
    source.update()
    path = str(tmp_path / "swa.weights.h5")
    source.save_weights(path)
    target = make_target()
    for v in target.tracked_variables:
        v.assign(v.numpy() + 1.0)
    target.update()
    before = _state(target)
    with pytest.raises(ValueError, match=message):
        target.load_weights(path)
    _assert_state(target, before)


def test_incomplete_store_is_refused_before_anything_is_written():
    model = _wide_model()  # packed and own averages: a partial write would be visible
    source = AveragedWeights(model)
    source.update()
    store = {}
    source.save_own_variables(store)
    target = AveragedWeights(_wide_model())
    target.update()
    before = _state(target)
    del store[str(len(model.trainable_variables) - 1)]  # the last average is missing
    with pytest.raises(ValueError, match="no '5' entry"):
        target.load_own_variables(store)
    _assert_state(target, before)
    with pytest.raises(ValueError, match="no 'fingerprint' entry"):
        target.load_own_variables({})
    _assert_state(target, before)


def test_save_weights_path_checks(tmp_path):
    averaged = AveragedWeights(_model())
    with pytest.raises(ValueError, match=r"must end in `.weights.h5`. Received: filepath="):
        averaged.save_weights(str(tmp_path / "swa.h5"))
    with pytest.raises(FileNotFoundError):
        averaged.load_weights(str(tmp_path / "missing.weights.h5"))


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    model = _model()
    averaged = AveragedWeights(model)
    averaged.update()
    path = tmp_path / "swa.weights.h5"
    averaged.save_weights(path)
    old = path.read_bytes()
    averaged.update()
    original = averaged.save_own_variables

    def broken(store):
        original(store)
        store["unwritable"] = object()  # h5py cannot store it: the write fails half-way

    monkeypatch.setattr(averaged, "save_own_variables", broken)
    with pytest.raises(TypeError):
        averaged.save_weights(path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swa.weights.h5"]
