"""keras_swa under tf.distribute: MirroredStrategy on the 2 logical CPU devices of conftest.py.

Every expected number is computed with numpy from recorded weights or from the data, split
between the replicas the way the strategy splits it.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_swa import SWA, AveragedWeights, distribution, update_bn
from keras_swa import batch_norm as batch_norm_module
from keras_swa.backend import keras, tf_variable

L = keras.layers
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def strategy():
    # One strategy for the whole file: strategies created one after the other in a process
    # hand out the same collective instance keys, and TensorFlow then mixes up their all-reduces.
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def _mlp(name_bn="bn", synchronized=False):
    kwargs = {"synchronized": True} if synchronized else {}
    return keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(6, name="d1"),
            L.BatchNormalization(momentum=0.9, name=name_bn, **kwargs),
            L.Dense(1, name="d2"),
        ]
    )


def _mlp_with_a_large_kernel():
    """A kernel of 16,384 floats (an average of its own) beside small ones (packed together)."""
    return keras.Sequential(
        [keras.Input((4,)), L.Dense(4096, name="wide"), L.BatchNormalization(), L.Dense(1)]
    )


def _data(n, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * 2.0 + 1.5).astype("float32")


def _local(strategy, variable):
    """The per-replica copies of a (Keras or tf) variable, as float64 numpy arrays."""
    return [
        np.asarray(v, dtype=np.float64)
        for v in strategy.experimental_local_results(tf_variable(variable))
    ]


def _assert_mirrored(strategy, averaged):
    """Every variable that holds the averages (and the count) is equal on both replicas."""
    assert averaged.variables
    for variable in averaged.variables:
        copies = _local(strategy, variable)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])


def _shares(batch, num_replicas):
    """How a global batch is split between replicas: consecutive, the larger shares first."""
    return np.array_split(batch, num_replicas)


def _expected_bn(inputs_per_batch):
    """Cumulative average, weighted by size, of the batch means and biased variances."""
    inputs_per_batch = [b for b in inputs_per_batch if len(b)]
    weights = np.array([len(b) for b in inputs_per_batch], dtype=np.float64)
    means = np.array([b.mean(axis=0) for b in inputs_per_batch])
    variances = np.array([b.var(axis=0) for b in inputs_per_batch])
    return weights @ means / weights.sum(), weights @ variances / weights.sum()


def _dense(x, layer):
    return np.asarray(x, np.float64) @ np.asarray(layer.kernel, np.float64) + np.asarray(
        layer.bias, np.float64
    )


def _assert_bn(strategy, layer, expected):
    for stat, value in zip((layer.moving_mean, layer.moving_variance), expected):
        copies = _local(strategy, stat)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_allclose(copies[0], value, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ AveragedWeights


@pytest.mark.parametrize("created_in_scope", [True, False])
def test_averages_are_mirrored_and_equal_numpy_means(strategy, created_in_scope):
    with strategy.scope():
        model = _mlp_with_a_large_kernel()
    if created_in_scope:
        with strategy.scope():
            averaged = AveragedWeights(model)
    else:
        averaged = AveragedWeights(model)  # finds model.distribute_strategy
    rng = np.random.default_rng(1)
    recorded = []
    for _ in range(5):
        for v in model.trainable_variables:
            v.assign(np.asarray(v) + rng.normal(size=v.shape).astype("float32"))
        recorded.append([np.asarray(v, np.float64) for v in model.trainable_variables])
        averaged.update()
    assert int(averaged.n_averaged.numpy()) == 5
    _assert_mirrored(strategy, averaged)
    for i, average in enumerate(averaged.averages):
        expected = np.mean([r[i] for r in recorded], axis=0)
        np.testing.assert_allclose(average.numpy(), expected, rtol=1e-6, atol=1e-6)
    # One compiled function per device, each traced once and never again across updates.
    compiled = dict(averaged._state.device_compiled)
    assert len(compiled) == strategy.num_replicas_in_sync
    traces = [f.experimental_get_tracing_count() for f in compiled.values()]
    assert traces == [1] * strategy.num_replicas_in_sync
    averaged.update()
    assert [f.experimental_get_tracing_count() for f in compiled.values()] == traces
    # Writing back puts the same average on every replica's copy of the weights.
    averaged.assign_to(model)
    for v in model.trainable_variables:
        copies = _local(strategy, v)
        np.testing.assert_array_equal(copies[0], copies[1])


def test_update_inside_strategy_run_in_a_custom_train_step(strategy):
    x = _data(32, seed=2)
    y = x.sum(axis=1, keepdims=True).astype("float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), L.Dense(3), L.Dense(1)])
        optimizer = keras.optimizers.SGD(0.01)
        averaged = AveragedWeights(model)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    )

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(xb, training=True) - yb)) / 8.0
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            averaged.update()  # replica context: one merge_call, one update per device

        strategy.run(replica_step, args=batch)

    recorded = []
    for batch in dataset:
        train_step(batch)
        recorded.append([np.asarray(v, np.float64) for v in model.trainable_variables])
    assert len(recorded) == 4
    assert int(averaged.n_averaged.numpy()) == 4
    assert not np.allclose(recorded[0][0], recorded[-1][0])  # training moved the weights
    _assert_mirrored(strategy, averaged)
    for i, average in enumerate(averaged.averages):
        np.testing.assert_allclose(
            average.numpy(), np.mean([r[i] for r in recorded], axis=0), rtol=1e-6, atol=1e-6
        )


def test_parameter_server_strategy_is_refused():
    # Building a real ParameterServerStrategy needs a running cluster; the refusal is a type
    # check, tested on an instance that was never connected to one.
    classes = [tf.distribute.experimental.ParameterServerStrategy]
    for cls in classes:
        instance = cls.__new__(cls)
        for what in ("AveragedWeights", "`update_bn`"):
            with pytest.raises(ValueError, match=f"{what} does not support ParameterServer"):
                distribution.check_strategy(instance, what)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert distribution.check_strategy(mirrored, "AveragedWeights") is mirrored


# ------------------------------------------------------------------ the fit callback


def test_swa_callback_in_fit_under_mirrored_strategy(strategy, tmp_path):
    x = _data(64, seed=3)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [1.0]], "float32")).astype("float32")
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,), name="features"),
                L.Dense(6, name="d1"),
                L.BatchNormalization(momentum=0.9, name="bn"),
                L.Dense(1, name="d2"),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    recorded = []
    recorder = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: recorded.append(
            [np.asarray(v, np.float64) for v in model.trainable_variables]
        )
        if epoch >= 1
        else None
    )
    swa = SWA(
        start_epoch=1,
        bn_data=x,
        bn_batch_size=24,  # 64 = 24 + 24 + 16: shares of 12, 12, 12, 12, 8, 8
        export_dir=str(tmp_path / "model"),
        verbose=0,
    )
    model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[recorder, swa])
    assert len(recorded) == 3 and int(swa.averaged.n_averaged.numpy()) == 3
    for i, v in enumerate(model.trainable_variables):
        copies = _local(strategy, v)
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_allclose(
            copies[0], np.mean([r[i] for r in recorded], axis=0), rtol=1e-5, atol=1e-6
        )
    h = _dense(x, model.get_layer("d1"))
    shares = [s for start in range(0, 64, 24) for s in _shares(h[start : start + 24], 2)]
    _assert_bn(strategy, model.get_layer("bn"), _expected_bn(shares))
    serve = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
    np.testing.assert_allclose(
        serve(features=tf.constant(x[:5]))["output_0"].numpy(),
        np.asarray(model(x[:5], training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


# ------------------------------------------------------------------ update_bn


@pytest.mark.parametrize("jit_compile", [False, True])
def test_update_bn_combines_every_replicas_statistics(strategy, jit_compile):
    with strategy.scope():
        model = _mlp()
    # 17 samples in batches of 8: shares 4+4, 4+4 and 1+0 (the empty share counts for nothing).
    x = _data(17, seed=4)
    assert update_bn(model, x, batch_size=8, verbose=0, jit_compile=jit_compile) == 17
    h = _dense(x, model.get_layer("d1"))
    shares = [s for start in range(0, 17, 8) for s in _shares(h[start : start + 8], 2)]
    expected = _expected_bn(shares)
    _assert_bn(strategy, model.get_layer("bn"), expected)
    # Not the statistics of the global batches: each replica's variance is of its own share.
    global_batches = _expected_bn([h[s : s + 8] for s in range(0, 17, 8)])
    assert not np.allclose(expected[1], global_batches[1], rtol=1e-3)
    assert model.get_layer("bn").momentum == 0.9


def test_update_bn_with_a_dataset_outside_the_scope(strategy):
    with strategy.scope():
        model = _mlp()
    x = _data(30, seed=5)
    # Called outside `strategy.scope()`: the model's strategy is used.
    seen = update_bn(model, tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(10), verbose=0)
    assert seen == 30
    h = _dense(x, model.get_layer("d1"))
    shares = [s for start in range(0, 30, 10) for s in _shares(h[start : start + 10], 2)]
    _assert_bn(strategy, model.get_layer("bn"), _expected_bn(shares))


def test_update_bn_synchronized_uses_global_batch_statistics(strategy):
    with strategy.scope():
        model = _mlp(synchronized=True)
    x = _data(21, seed=6)
    assert update_bn(model, x, batch_size=8, verbose=0) == 21
    h = _dense(x, model.get_layer("d1"))
    _assert_bn(strategy, model.get_layer("bn"), _expected_bn([h[s : s + 8] for s in range(0, 21, 8)]))
    with pytest.raises(ValueError, match="synchronized"):
        update_bn(model, x, batch_size=8, verbose=0, jit_compile=True)


def test_update_bn_refuses_a_replica_context(strategy):
    with strategy.scope():
        model = _mlp()
    x = tf.constant(_data(8, seed=7))

    def replica_fn():
        update_bn(model, x, verbose=0)

    with pytest.raises(RuntimeError, match="outside `strategy.run`"):
        strategy.run(replica_fn)


# ------------------------------------------------------------------ TPU readiness


def test_bn_accumulation_compiles_with_xla_in_float32_and_stays_exact():
    rng = np.random.default_rng(8)
    statistics = [rng.normal(size=(400, 3)).astype("float32") + 1000.0, rng.random((400, 5))]
    statistics[1] = statistics[1].astype("float32")
    counts = rng.integers(1, 64, size=400).astype("float32")
    fold = tf.function(batch_norm_module.accumulate, jit_compile=True)
    sums = compensations = tf.zeros([8])
    for k in range(400):
        sums, compensations = fold(
            sums, compensations, [statistics[0][k], statistics[1][k]], tf.constant(counts[k])
        )
    total = (sums + compensations).numpy()
    expected = np.concatenate(
        [counts.astype(np.float64) @ s.astype(np.float64) for s in statistics]
    )
    # Compensated float32: the error stays at float32 rounding of the total.
    np.testing.assert_allclose(total, expected, rtol=2e-7)
    hlo = fold.experimental_get_compiler_ir(
        sums, compensations, [statistics[0][0], statistics[1][0]], tf.constant(1.0)
    )(stage="hlo")
    assert "HloModule" in hlo and "f64" not in hlo


def test_update_bn_jit_compiled_on_one_device():
    model = _mlp()
    x = _data(20, seed=9)
    update_bn(model, x, batch_size=8, verbose=0, jit_compile=True)
    h = _dense(x, model.get_layer("d1"))
    expected = _expected_bn([h[s : s + 8] for s in range(0, 20, 8)])
    layer = model.get_layer("bn")
    np.testing.assert_allclose(np.asarray(layer.moving_mean), expected[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), expected[1], rtol=RTOL, atol=ATOL)

