"""Tests for keras_swa.schedules against formulas written out independently here."""

import doctest
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from keras_swa import schedules
from keras_swa.backend import IS_KERAS_3, keras
from keras_swa.schedules import Anneal, Constant, Cyclic, PaperSchedule, Triangular

# ----------------------------------------------------------------------------- references
# Pure-Python transcriptions of the formulas (the paper, torch's SWALR, the official SWA code,
# tensorflow-addons' CyclicalLearningRate). They share no code with keras_swa.


def ref_cyclic(step, swa_lr, swa_lr_min, cycle_length, start_step=0):
    # Izmailov et al. 2018, eq. (2): alpha(i) = (1 - t(i)) a1 + t(i) a2,
    # t(i) = (mod(i - 1, c) + 1) / c, with i counted from the SWA start (i = 1, 2, ...).
    a1, a2, c = swa_lr, swa_lr_min, cycle_length
    i = step - start_step + 1
    if i < 1:
        return a1
    t = (((i - 1) % c) + 1) / c
    return (1 - t) * a1 + t * a2


def ref_constant(step, learning_rate):
    return learning_rate


def ref_anneal(step, initial_learning_rate, swa_lr, anneal_steps, start_step=0, strategy="cos"):
    if step < start_step:
        return initial_learning_rate
    t = min(1.0, (step - start_step + 1) / anneal_steps)
    if strategy == "cos":
        alpha = (1 - math.cos(math.pi * t)) / 2
    else:
        alpha = t
    return swa_lr * alpha + initial_learning_rate * (1 - alpha)


def ref_paper(step, initial_learning_rate, swa_lr, swa_start, swa_lr_min=None, cycle_length=1):
    if step >= swa_start:
        if swa_lr_min is None:
            return swa_lr
        return ref_cyclic(step, swa_lr, swa_lr_min, cycle_length, start_step=swa_start)
    # github.com/timgaripov/swa train.py, schedule(epoch), with steps for epochs.
    t = step / swa_start
    lr_ratio = swa_lr / initial_learning_rate
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - lr_ratio) * (t - 0.5) / 0.4
    else:
        factor = lr_ratio
    return initial_learning_rate * factor


def ref_triangular(
    step, initial_learning_rate, maximal_learning_rate, step_size, mode="triangular", gamma=1.0
):
    step = np.float64(step)
    cycle = np.floor(1 + step / (2 * step_size))
    x = np.abs(step / step_size - 2 * cycle + 1)
    if mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        scale = 1 / 2 ** (cycle - 1)
    else:
        scale = gamma**step
    return initial_learning_rate + (
        maximal_learning_rate - initial_learning_rate
    ) * np.maximum(0, 1 - x) * scale


# (id, class, kwargs, reference, steps)
CASES = [
    ("cyclic", Cyclic, dict(swa_lr=0.05, swa_lr_min=0.001, cycle_length=5), ref_cyclic, 31),
    (
        "cyclic_start",
        Cyclic,
        dict(swa_lr=0.1, swa_lr_min=0.01, cycle_length=4, start_step=7),
        ref_cyclic,
        40,
    ),
    (
        "cyclic_c1",
        Cyclic,
        dict(swa_lr=0.05, swa_lr_min=0.01, cycle_length=1, start_step=3),
        ref_cyclic,
        10,
    ),
    ("cyclic_flat", Cyclic, dict(swa_lr=0.02, swa_lr_min=0.02, cycle_length=3), ref_cyclic, 10),
    ("constant", Constant, dict(learning_rate=0.03), ref_constant, 5),
    (
        "anneal_cos",
        Anneal,
        dict(initial_learning_rate=0.1, swa_lr=0.01, anneal_steps=5, start_step=3),
        ref_anneal,
        20,
    ),
    (
        "anneal_linear",
        Anneal,
        dict(initial_learning_rate=0.1, swa_lr=0.01, anneal_steps=4, strategy="linear"),
        ref_anneal,
        12,
    ),
    (
        "anneal_up_1",
        Anneal,
        dict(initial_learning_rate=0.01, swa_lr=0.1, anneal_steps=1, start_step=2),
        ref_anneal,
        8,
    ),
    (
        "paper_constant",
        PaperSchedule,
        dict(initial_learning_rate=0.1, swa_lr=0.01, swa_start=20),
        ref_paper,
        41,
    ),
    (
        "paper_cyclic",
        PaperSchedule,
        dict(
            initial_learning_rate=0.1, swa_lr=0.05, swa_start=37, swa_lr_min=0.001, cycle_length=4
        ),
        ref_paper,
        70,
    ),
    (
        "paper_sgd_baseline",
        PaperSchedule,
        dict(initial_learning_rate=0.1, swa_lr=0.001, swa_start=100),
        ref_paper,
        120,
    ),
    (
        "triangular",
        Triangular,
        dict(initial_learning_rate=0.001, maximal_learning_rate=0.01, step_size=4),
        ref_triangular,
        30,
    ),
    (
        "triangular2",
        Triangular,
        dict(
            initial_learning_rate=0.001,
            maximal_learning_rate=0.01,
            step_size=3,
            mode="triangular2",
        ),
        ref_triangular,
        30,
    ),
    (
        "exp_range",
        Triangular,
        dict(
            initial_learning_rate=0.001,
            maximal_learning_rate=0.01,
            step_size=2.5,
            mode="exp_range",
            gamma=0.97,
        ),
        ref_triangular,
        30,
    ),
]
CASE_IDS = [c[0] for c in CASES]


def _expected(ref, kwargs, steps):
    return np.array([ref(s, **kwargs) for s in steps], dtype=np.float64)


def _eager(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("name,cls,kwargs,ref,n", CASES, ids=CASE_IDS)
def test_values_match_reference(name, cls, kwargs, ref, n):
    schedule = cls(**kwargs)
    steps = list(range(n))
    expected = _expected(ref, kwargs, steps)
    assert_close(_eager(schedule, steps), expected)
    # The step arrives as a Python int, an int32/int64 tensor, an int64 variable
    # (`optimizer.iterations`) or a float (older optimizers cast it): all agree.
    for s in (0, n // 3, n - 1):
        for step in (tf.constant(s, tf.int32), tf.constant(s, tf.int64), float(s)):
            assert_close(float(schedule(step)), ref(s, **kwargs))
        assert_close(float(schedule(tf.Variable(s, dtype=tf.int64))), ref(s, **kwargs))
    value = schedule(tf.constant(n, tf.int64))
    assert value.dtype == tf.float32
    assert value.shape == ()


def test_hand_computed_cyclic_values():
    # a1 = 0.05, a2 = 0.01, c = 4, SWA from step 2: 0.05 before, then 0.04 0.03 0.02 0.01 ...
    schedule = Cyclic(0.05, 0.01, 4, start_step=2)
    np.testing.assert_allclose(
        _eager(schedule, range(11)),
        [0.05, 0.05, 0.04, 0.03, 0.02, 0.01, 0.04, 0.03, 0.02, 0.01, 0.04],
        rtol=1e-6,
    )


@pytest.mark.tf_only("tf.function and its XLA compilation")
@pytest.mark.parametrize("name,cls,kwargs,ref,n", CASES, ids=CASE_IDS)
def test_graph_and_xla_match_eager(name, cls, kwargs, ref, n):
    schedule = cls(**kwargs)
    steps = list(range(n))
    spec = [tf.TensorSpec([], tf.int64)]
    graph = tf.function(lambda s: schedule(s), input_signature=spec)
    xla = tf.function(lambda s: schedule(s), input_signature=spec, jit_compile=True)
    eager = _eager(schedule, steps)
    as_graph = np.array([float(graph(tf.constant(s, tf.int64))) for s in steps])
    as_xla = np.array([float(xla(tf.constant(s, tf.int64))) for s in steps])
    np.testing.assert_allclose(as_graph, eager, rtol=1e-5)
    np.testing.assert_allclose(as_xla, eager, rtol=1e-5)
    assert_close(as_xla, _expected(ref, kwargs, steps))

    # Reading an int64 variable inside a compiled function, as an optimizer does.
    iterations = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=True)
    def read_and_advance():
        lr = schedule(iterations)
        iterations.assign_add(1)
        return lr

    assert_close([float(read_and_advance()) for _ in steps], eager)


@pytest.mark.tf_only("int64 steps past 2**31; JAX without jax_enable_x64 counts in int32")
def test_large_steps_use_integer_arithmetic():
    # float32 cannot count past 2**24; a step beyond 2**31 must still land on the right phase.
    big = 2**31 + 10
    schedule = Cyclic(0.1, 0.01, cycle_length=7, start_step=5)
    for s in range(big, big + 15):
        assert_close(float(schedule(tf.constant(s, tf.int64))), ref_cyclic(s, 0.1, 0.01, 7, 5))
        assert schedule.is_cycle_end(s) == ((s - 5 + 1) % 7 == 0)
    paper = PaperSchedule(0.1, 0.05, swa_start=3, swa_lr_min=0.01, cycle_length=6)
    for s in range(big, big + 13):
        assert_close(float(paper(tf.constant(s, tf.int64))), ref_paper(s, 0.1, 0.05, 3, 0.01, 6))
    anneal = Anneal(0.1, 0.01, anneal_steps=3, start_step=big)
    for s in range(big - 2, big + 5):
        assert_close(float(anneal(tf.constant(s, tf.int64))), ref_anneal(s, 0.1, 0.01, 3, big))


# ----------------------------------------------------------------------------- captures


@pytest.mark.parametrize(
    "swa_lr,swa_lr_min,cycle_length,start_step",
    [(0.05, 0.001, 5, 0), (0.1, 0.01, 4, 7), (0.05, 0.01, 1, 3), (0.2, 0.0, 3, 2)],
)
def test_is_cycle_end_exactly_where_lr_hits_minimum(swa_lr, swa_lr_min, cycle_length, start_step):
    schedule = Cyclic(swa_lr, swa_lr_min, cycle_length, start_step=start_step)
    steps = range(start_step + 4 * cycle_length + 3)
    values = np.array([np.asarray(schedule(s)) for s in steps])
    at_min = values == np.float32(swa_lr_min)
    ends = np.array([schedule.is_cycle_end(s) for s in steps])
    np.testing.assert_array_equal(ends, at_min)
    # Independently: the capture points are i = c, 2c, ... with i = step - start_step + 1.
    expected = [s - start_step + 1 >= 1 and (s - start_step + 1) % cycle_length == 0 for s in steps]
    np.testing.assert_array_equal(ends, expected)
    assert ends.sum() >= 4
    assert all(isinstance(schedule.is_cycle_end(s), bool) for s in steps)
    assert schedule.is_cycle_end(np.int64(start_step + cycle_length - 1))
    assert schedule.is_cycle_end(tf.constant(start_step + cycle_length - 1))


def test_is_cycle_end_rejects_non_integers():
    with pytest.raises(TypeError, match="2.5"):
        Cyclic(0.1, 0.01, 4).is_cycle_end(2.5)


def test_paper_schedule_constant_after_swa_start():
    # The SGD baseline: 1% of the initial rate over the last 10% of the budget.
    schedule = PaperSchedule(0.1, 0.001, swa_start=100)
    assert_close(_eager(schedule, range(0, 51)), 0.1)
    assert_close(_eager(schedule, range(90, 300)), 0.001)
    assert_close(float(schedule(70)), 0.1 - (0.1 - 0.001) * 0.5)


# ----------------------------------------------------------------------------- serialization


@pytest.mark.parametrize("name,cls,kwargs,ref,n", CASES, ids=CASE_IDS)
def test_config_round_trip(name, cls, kwargs, ref, n):
    schedule = cls(**kwargs)
    config = schedule.get_config()
    assert json.loads(json.dumps(config)) == config
    for key, value in kwargs.items():
        assert config[key] == value
    restored = cls.from_config(json.loads(json.dumps(config)))
    assert type(restored) is cls
    assert restored.get_config() == config
    steps = list(range(n))
    np.testing.assert_array_equal(_eager(restored, steps), _eager(schedule, steps))


@pytest.mark.parametrize("name,cls,kwargs,ref,n", CASES, ids=CASE_IDS)
def test_keras_serialization_round_trip(name, cls, kwargs, ref, n):
    schedule = cls(**kwargs)
    steps = list(range(n))
    serialized = keras.saving.serialize_keras_object(schedule)
    serialized = json.loads(json.dumps(serialized))
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is cls
    np.testing.assert_array_equal(_eager(restored, steps), _eager(schedule, steps))

    serialized = json.loads(json.dumps(keras.optimizers.schedules.serialize(schedule)))
    restored = keras.optimizers.schedules.deserialize(serialized)
    assert type(restored) is cls
    np.testing.assert_array_equal(_eager(restored, steps), _eager(schedule, steps))


def test_optimizer_config_round_trip():
    schedule = Cyclic(0.05, 0.01, 4, start_step=3)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    config = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    restored = keras.optimizers.deserialize(config)
    assert isinstance(restored.learning_rate, Cyclic) or isinstance(
        getattr(restored, "_learning_rate", None), Cyclic
    )
    assert restored.get_config()["learning_rate"] == optimizer.get_config()["learning_rate"]


@pytest.mark.parametrize("name,cls,kwargs,ref,n", CASES, ids=CASE_IDS)
def test_from_config_rejects_unknown_keys(name, cls, kwargs, ref, n):
    config = cls(**kwargs).get_config()
    config["bogus_key"] = 1
    with pytest.raises(ValueError, match="bogus_key"):
        cls.from_config(config)


# ----------------------------------------------------------------------------- training


class _RecordKernel(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        # Through `self.model`: on JAX that writes fit's training state into the variables.
        kernel = self.model.layers[0].kernel
        self.values.append(float(np.asarray(kernel.numpy()).ravel()[0]))


TRAIN_CASES = [
    Cyclic(0.05, 0.01, cycle_length=3, start_step=2),
    Anneal(0.1, 0.02, anneal_steps=4, start_step=3),
    PaperSchedule(0.1, 0.02, swa_start=6, swa_lr_min=0.005, cycle_length=2),
    Triangular(0.01, 0.05, step_size=2, mode="triangular2"),
]
TRAIN_REFS = [
    lambda s: ref_cyclic(s, 0.05, 0.01, 3, 2),
    lambda s: ref_anneal(s, 0.1, 0.02, 4, 3),
    lambda s: ref_paper(s, 0.1, 0.02, 6, 0.005, 2),
    lambda s: ref_triangular(s, 0.01, 0.05, 2, "triangular2"),
]


@pytest.mark.parametrize(
    "schedule,ref", list(zip(TRAIN_CASES, TRAIN_REFS)), ids=["cyclic", "anneal", "paper", "tri2"]
)
def test_optimizer_uses_schedule_while_training(schedule, ref):
    # loss = w * x with x = 1 gives dloss/dw = 1, so plain SGD moves w by exactly -lr(step):
    # the learning rate of step s (0-based) can be read off the weights.
    k = 10
    layer = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")
    model = keras.Sequential([keras.Input(shape=(1,)), layer])
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    model.compile(optimizer=optimizer, loss=lambda y_true, y_pred: y_pred)
    recorder = _RecordKernel()
    x = np.ones((k, 1), np.float32)
    model.fit(x, x, batch_size=1, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])

    expected = np.array([ref(s) for s in range(k)])
    weights = np.array([0.0] + recorder.values)
    np.testing.assert_allclose(-np.diff(weights), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(weights[-1], -expected.sum(), rtol=1e-5)
    assert int(optimizer.iterations.numpy()) == k
    # The schedule evaluated at the optimizer's step counter gives the next step's rate.
    np.testing.assert_allclose(float(schedule(optimizer.iterations)), ref(k), rtol=1e-5)
    # `optimizer.learning_rate` differs between versions: Keras 3 evaluates the schedule at
    # `iterations` (the next step's rate), tf_keras returns the rate of the last applied step.
    current = float(np.asarray(optimizer.learning_rate))
    np.testing.assert_allclose(current, ref(k) if IS_KERAS_3 else ref(k - 1), rtol=1e-5)


# ----------------------------------------------------------------------------- validation

BAD_ARGS = [
    (Cyclic, dict(swa_lr=0, swa_lr_min=0.0, cycle_length=2), "swa_lr=0"),
    (Cyclic, dict(swa_lr=-0.1, swa_lr_min=0.0, cycle_length=2), "swa_lr=-0.1"),
    (Cyclic, dict(swa_lr=float("nan"), swa_lr_min=0.0, cycle_length=2), "swa_lr=nan"),
    (Cyclic, dict(swa_lr="0.1", swa_lr_min=0.0, cycle_length=2), "swa_lr='0.1'"),
    (Cyclic, dict(swa_lr=0.1, swa_lr_min=-0.01, cycle_length=2), "swa_lr_min=-0.01"),
    (Cyclic, dict(swa_lr=0.1, swa_lr_min=0.25, cycle_length=2), "swa_lr_min=0.25"),
    (Cyclic, dict(swa_lr=0.1, swa_lr_min=0.01, cycle_length=0), "cycle_length=0"),
    (Cyclic, dict(swa_lr=0.1, swa_lr_min=0.01, cycle_length=2.5), "cycle_length=2.5"),
    (Cyclic, dict(swa_lr=0.1, swa_lr_min=0.01, cycle_length=True), "cycle_length=True"),
    (Cyclic, dict(swa_lr=0.1, swa_lr_min=0.01, cycle_length=3, start_step=-1), "start_step=-1"),
    (Cyclic, dict(swa_lr=0.1, swa_lr_min=0.01, cycle_length=3, start_step=1.5), "start_step=1.5"),
    (Constant, dict(learning_rate=0), "learning_rate=0"),
    (Constant, dict(learning_rate=-0.5), "learning_rate=-0.5"),
    (Constant, dict(learning_rate=float("inf")), "learning_rate=inf"),
    (Constant, dict(learning_rate=None), "learning_rate=None"),
    (Anneal, dict(initial_learning_rate=0, swa_lr=0.1, anneal_steps=3), "initial_learning_rate=0"),
    (Anneal, dict(initial_learning_rate=0.1, swa_lr=-3, anneal_steps=3), "swa_lr=-3"),
    (Anneal, dict(initial_learning_rate=0.1, swa_lr=0.1, anneal_steps=0), "anneal_steps=0"),
    (Anneal, dict(initial_learning_rate=0.1, swa_lr=0.1, anneal_steps=1.5), "anneal_steps=1.5"),
    (
        Anneal,
        dict(initial_learning_rate=0.1, swa_lr=0.1, anneal_steps=3, start_step=-2),
        "start_step=-2",
    ),
    (
        Anneal,
        dict(initial_learning_rate=0.1, swa_lr=0.1, anneal_steps=3, strategy="sin"),
        "strategy='sin'",
    ),
    (PaperSchedule, dict(initial_learning_rate=-0.1, swa_lr=0.01, swa_start=10), "=-0.1"),
    (PaperSchedule, dict(initial_learning_rate=0.1, swa_lr=0, swa_start=10), "swa_lr=0"),
    (PaperSchedule, dict(initial_learning_rate=0.1, swa_lr=0.01, swa_start=0), "swa_start=0"),
    (PaperSchedule, dict(initial_learning_rate=0.1, swa_lr=0.01, swa_start=2.5), "swa_start=2.5"),
    (
        PaperSchedule,
        dict(initial_learning_rate=0.1, swa_lr=0.01, swa_start=10, swa_lr_min=-1),
        "swa_lr_min=-1",
    ),
    (
        PaperSchedule,
        dict(initial_learning_rate=0.1, swa_lr=0.05, swa_start=10, swa_lr_min=0.5),
        "swa_lr_min=0.5",
    ),
    (
        PaperSchedule,
        dict(initial_learning_rate=0.1, swa_lr=0.05, swa_start=10, swa_lr_min=0.01, cycle_length=0),
        "cycle_length=0",
    ),
    (
        PaperSchedule,
        dict(initial_learning_rate=0.1, swa_lr=0.05, swa_start=10, cycle_length=3),
        "cycle_length=3",
    ),
    (
        Triangular,
        dict(initial_learning_rate=-0.1, maximal_learning_rate=0.1, step_size=2),
        "initial_learning_rate=-0.1",
    ),
    (
        Triangular,
        dict(initial_learning_rate=0.0, maximal_learning_rate=0, step_size=2),
        "maximal_learning_rate=0",
    ),
    (
        Triangular,
        dict(initial_learning_rate=0.2, maximal_learning_rate=0.1, step_size=2),
        "initial_learning_rate=0.2",
    ),
    (
        Triangular,
        dict(initial_learning_rate=0.01, maximal_learning_rate=0.1, step_size=0),
        "step_size=0",
    ),
    (
        Triangular,
        dict(initial_learning_rate=0.01, maximal_learning_rate=0.1, step_size=-2),
        "step_size=-2",
    ),
    (
        Triangular,
        dict(initial_learning_rate=0.01, maximal_learning_rate=0.1, step_size=2, mode="cosine"),
        "mode='cosine'",
    ),
    (
        Triangular,
        dict(
            initial_learning_rate=0.01,
            maximal_learning_rate=0.1,
            step_size=2,
            mode="exp_range",
            gamma=0,
        ),
        "gamma=0",
    ),
    (
        Triangular,
        dict(initial_learning_rate=0.01, maximal_learning_rate=0.1, step_size=2, gamma=0.9),
        "gamma=0.9",
    ),
]


@pytest.mark.parametrize(
    "cls,kwargs,bad", BAD_ARGS, ids=[f"{c.__name__}-{b}" for c, _, b in BAD_ARGS]
)
def test_bad_arguments_raise(cls, kwargs, bad):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert bad in str(info.value)
    assert "Received:" in str(info.value)


def test_error_message_is_keras_style():
    with pytest.raises(ValueError) as info:
        Cyclic(0.1, 0.01, cycle_length=0)
    assert str(info.value) == (
        "`cycle_length` must be a positive integer. Received: cycle_length=0"
    )


def test_numpy_arguments_are_accepted_and_stored_as_python_numbers():
    schedule = Cyclic(np.float32(0.5), np.float64(0.25), np.int64(4), start_step=np.int32(2))
    config = schedule.get_config()
    assert json.loads(json.dumps(config)) == {
        "swa_lr": 0.5,
        "swa_lr_min": 0.25,
        "cycle_length": 4,
        "start_step": 2,
    }


# ----------------------------------------------------------------------------- module


def test_docstring_examples_run():
    failures, attempted = doctest.testmod(schedules, verbose=False)
    assert attempted > 0
    assert failures == 0


def test_public_names_are_documented_schedules():
    # The values are checked against the paper's formula above (`ref_cyclic`, eq. (2)); here
    # only what makes a name usable: a documented LearningRateSchedule.
    assert schedules.__all__
    for name in schedules.__all__:
        cls = getattr(schedules, name)
        assert issubclass(cls, keras.optimizers.schedules.LearningRateSchedule), name
        assert cls.__doc__ and cls.__doc__.strip(), name
