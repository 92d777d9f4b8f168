"""The packed storage of the JAX averages (`keras_swa.backends.jax`, `keras_swa.packing`).

Small variables' averages share one flat fp32 `keras.Variable` on JAX as on TensorFlow. These
tests check, against numpy over recorded weights, that packing changes nothing a user sees:
packed and unpacked layouts give numpy's mean, a rule that is not elementwise sees each
variable on its own, a refused capture leaves the packed state bit for bit, and the flat
average is updated in place like the others. Runs with `KERAS_BACKEND=jax`.
"""

import warnings

import numpy as np
import pytest

from keras_swa import backend
from keras_swa.averaged_weights import AveragedWeights
from keras_swa.backend import keras

pytestmark = pytest.mark.jax_only

if backend.backend_name() == "jax":
    from keras_swa.backends import jax as jax_backend


def _model():
    # Dense(200) on 100 inputs: a 20,000-float kernel (its own average); the rest (bias, BN
    # scale/offset, the second Dense) are under PACK_BELOW and share the flat average.
    return keras.Sequential(
        [
            keras.Input((100,)),
            keras.layers.Dense(200),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )


def _perturb(variables, rng):
    for v in variables:
        v.assign((v.numpy() + rng.normal(size=v.shape)).astype(np.float32))


def _snapshot(variables):
    return [np.asarray(v.numpy(), np.float64) for v in variables]


def _averages(variables, pack_below, elementwise=False, check=True, **kwargs):
    """A JAX `Averages` with the rule of `AveragedWeights(**kwargs)` and the given layout."""
    rule = AveragedWeights(variables, **kwargs)._rule()
    return jax_backend.Averages(
        variables, rule, check=check, pack_below=pack_below, elementwise=elementwise
    )


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("pack_below", [0, 16384, 10**9])
def test_packed_and_unpacked_layouts_give_numpys_mean(pack_below, elementwise):
    model = _model()
    variables = model.trainable_variables
    state = _averages(variables, pack_below, elementwise)
    own, packed = state.layout.own, state.layout.packed
    if pack_below == 0:
        assert packed == [] and len(state.storage) == len(variables)
    elif pack_below == 16384:
        assert own == [0] and len(packed) == len(variables) - 1 and len(state.storage) == 2
    else:
        assert own == [] and len(state.storage) == 1
    rng = np.random.default_rng(0)
    recorded = []
    for _ in range(5):
        _perturb(variables, rng)
        recorded.append(_snapshot(variables))
        assert state.update() is True
    values = state.values()
    assert [tuple(v.shape) for v in values] == [tuple(v.shape) for v in variables]
    for i, value in enumerate(values):
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-6, atol=2e-6)
    # `averages` names, per tracked variable, the keras.Variable that holds its average.
    holders = state.averages
    assert len(holders) == len(variables)
    for i in packed:
        assert holders[i] is state.storage[-1]
    assert int(state.count.numpy()) == 5
    assert state.traces == 1


@pytest.mark.parametrize("elementwise", [False, True])
def test_packed_ema_matches_numpy(elementwise):
    model = _model()
    variables = model.trainable_variables
    state = _averages(variables, 16384, elementwise, mode="ema", decay=0.9)
    rng = np.random.default_rng(4)
    expected = None
    for _ in range(4):
        _perturb(variables, rng)
        snap = _snapshot(variables)
        expected = snap if expected is None else [0.9 * e + 0.1 * s for e, s in zip(expected, snap)]
        assert state.update() is True
    for value, e in zip(state.values(), expected):
        np.testing.assert_allclose(np.asarray(value), e, rtol=1e-5, atol=1e-5)


def test_a_shape_dependent_rule_sees_each_packed_variable_with_its_shape():
    # Elementwise in every op, but it picks its formula from the shape: given the flat array
    # it would treat every packed variable as a vector. The default (elementwise=False) gives
    # it views of the variables' own shapes.
    def rule(averages, values, n):
        return [v * 2.0 if len(a.shape) == 2 else v + 0.0 * a for a, v in zip(averages, values)]

    model = _model()
    variables = model.trainable_variables
    state = jax_backend.Averages(variables, rule, check=True)
    assert len(state.layout.packed) > 1
    rng = np.random.default_rng(5)
    _perturb(variables, rng)
    snap = _snapshot(variables)
    state.update()
    for value, s in zip(state.values(), snap):
        np.testing.assert_allclose(np.asarray(value), s * 2.0 if s.ndim == 2 else s, rtol=1e-6)


def test_a_rule_that_is_not_elementwise_sees_each_variable_on_its_own():
    ops = keras.ops

    def centred(averages, values, n):
        # The new average of a variable depends on all of its values: a rule that would go
        # wrong if it were given the packed flat array instead of one array per variable.
        return [v - ops.mean(v) + 0.0 * a for a, v in zip(averages, values)]

    model = _model()
    averaged = AveragedWeights(model, multi_avg_fn=centred)
    rng = np.random.default_rng(1)
    for _ in range(3):
        _perturb(model.trainable_variables, rng)
        last = _snapshot(model.trainable_variables)
        averaged.update()
    for average, value in zip(averaged.averages, last):
        np.testing.assert_allclose(
            np.asarray(average), value - value.mean(), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("where", ["packed", "own"])
def test_a_refused_capture_leaves_the_packed_state_bit_for_bit(where):
    model = _model()
    variables = model.trainable_variables
    averaged = AveragedWeights(model, nonfinite="skip")
    state = averaged._jax
    assert state.layout.packed and state.layout.own
    rng = np.random.default_rng(2)
    for _ in range(2):
        _perturb(variables, rng)
        averaged.update()
    stored = [np.asarray(a.value).copy() for a in state.storage]
    target = variables[state.layout.packed[2] if where == "packed" else state.layout.own[0]]
    poisoned = target.numpy()
    poisoned.flat[3] = np.nan
    target.assign(poisoned)
    with pytest.warns(UserWarning, match="skipped"):
        assert averaged.update() is False
    assert int(averaged.n_averaged.numpy()) == 2
    for before, after in zip(stored, state.storage):
        after = np.asarray(after.value)
        np.testing.assert_array_equal(before.view(np.uint32), after.view(np.uint32))


def test_finite_small_weights_whose_sum_overflows_are_folded_in():
    big = np.float32(3e38)
    variables = [
        keras.Variable(np.zeros([20000], np.float32)),
        keras.Variable(np.full([8], big, np.float32)),
        keras.Variable(np.full([5], big, np.float32)),
    ]
    averaged = AveragedWeights(variables)
    assert averaged._jax.layout.packed == [1, 2]
    assert averaged.update() is True
    np.testing.assert_array_equal(np.asarray(averaged.averages[2]), np.full([5], big))


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("check", [False, True])
def test_every_stored_average_is_updated_in_place(elementwise, check):
    model = _model()
    state = _averages(model.trainable_variables, 16384, elementwise, check)
    state.update()
    before = [a.value for a in state.storage]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Some donated buffers were not usable"
        state.update()
    assert all(array.is_deleted() for array in before)
    assert state.traces == 1


def test_swap_and_restore_through_the_packed_average():
    model = _model()
    variables = model.trainable_variables
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(3)
    recorded = []
    for _ in range(3):
        _perturb(variables, rng)
        recorded.append(_snapshot(variables))
        averaged.update()
    weights = [v.numpy().copy() for v in variables]
    with averaged.swap():
        for i, v in enumerate(variables):
            expected = np.mean([r[i] for r in recorded], axis=0)
            np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=2e-6)
    for w, v in zip(weights, variables):
        np.testing.assert_array_equal(w, v.numpy())
    store = {}
    averaged.save_own_variables(store)
    restored = AveragedWeights(model)
    restored.load_own_variables(store)
    for a, b in zip(averaged.averages, restored.averages):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored.reset()
    assert all(not np.asarray(a).any() for a in restored.averages)


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_refused_capture_leaves_each_layouts_state_bit_for_bit(elementwise, value):
    model = _model()
    variables = model.trainable_variables
    state = _averages(variables, 16384, elementwise)
    rng = np.random.default_rng(6)
    _perturb(variables, rng)
    assert state.update() is True
    stored = [np.asarray(a.value).copy() for a in state.storage]
    small = variables[state.layout.packed[-1]]
    poisoned = small.numpy()
    poisoned.flat[0] = value
    small.assign(poisoned)
    assert state.update() is False
    assert int(state.count.numpy()) == 1
    for before, after in zip(stored, state.storage):
        after = np.asarray(after.value)
        np.testing.assert_array_equal(before.view(np.uint32), after.view(np.uint32))
    flags = state.finite_flags()
    assert not flags[state.layout.packed[-1]] and flags.sum() == len(variables) - 1
