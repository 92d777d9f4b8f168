"""Tests for `keras_swa.batch_norm.update_bn`, checked against numpy statistics of the BN inputs.

The expected statistics are computed here independently of the code under test: the BN layers'
inputs come from numpy forward passes written out by hand (training-mode BN normalises with the
batch's own statistics) or from a Keras sub-model, and the expected moving statistics are the
batch-size-weighted averages of each batch's mean and variance:

    moving_mean = sum_k n_k * mean(batch_k) / sum_k n_k
    moving_var  = sum_k n_k * var(batch_k)  / sum_k n_k

with the biased variance, except for tf_keras' fused kernel (4D inputs, conv nets), whose moving
variance folds in the Bessel-corrected batch variance; `update_bn` keeps what the layer itself does.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_swa.backend import IS_KERAS_3, keras
from keras_swa.batch_norm import update_bn

L = keras.layers
RTOL = 1e-5
ATOL = 1e-6


# ------------------------------------------------------------------ independent numpy reference


def _f64(value):
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float64)


def _batches(a, batch_size):
    return [a[i : i + batch_size] for i in range(0, len(a), batch_size)]


def _expected_stats(batch_inputs, axes=(0,), ddof=0):
    """Batch-size-weighted means of the per-batch means and variances."""
    weights = np.array([len(b) for b in batch_inputs], dtype=np.float64)
    means = np.array([b.mean(axis=axes) for b in batch_inputs])
    variances = np.array([b.var(axis=axes, ddof=ddof) for b in batch_inputs])
    return weights @ means / weights.sum(), weights @ variances / weights.sum()


def _dense(h, layer):
    return h @ _f64(layer.kernel) + _f64(layer.bias)


def _bn_train(h, layer):
    """Training-mode BatchNormalization of one batch, over axis 0."""
    mean, var = h.mean(axis=0), h.var(axis=0)
    return _f64(layer.gamma) * (h - mean) / np.sqrt(var + layer.epsilon) + _f64(layer.beta)


def _np(variable):
    return np.array(variable.numpy())


def _stats(layer):
    return _np(layer.moving_mean), _np(layer.moving_variance)


def _assert_stats(layer, expected):
    mean, var = _stats(layer)
    np.testing.assert_allclose(mean, expected[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(var, expected[1], rtol=RTOL, atol=ATOL)


def _data(n=50, d=8, seed=0):
    rng = np.random.default_rng(seed)
    # Shifted and scaled so that means and variances are far from BN's initial 0 and 1.
    return (rng.normal(size=(n, d)) * 3.0 + 2.0).astype("float32")


def _set_stats(layer, seed):
    rng = np.random.default_rng(seed)
    shape = layer.moving_mean.shape
    layer.moving_mean.assign(rng.normal(size=shape).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=shape).astype("float32"))


# ------------------------------------------------------------------ models


def _two_bn_mlp():
    """Dense -> BN -> ReLU -> Dense -> BN: the second BN sees the first's training-mode output."""
    return keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(6, name="d1"),
            L.BatchNormalization(momentum=0.9, name="bn1"),
            L.ReLU(),
            L.Dense(5, name="d2"),
            L.BatchNormalization(momentum=0.8, name="bn2"),
        ]
    )


def _two_bn_expected(model, x, batch_size):
    d1, bn1, d2 = (model.get_layer(n) for n in ("d1", "bn1", "d2"))
    in1 = [_dense(b, d1) for b in _batches(_f64(x), batch_size)]
    in2 = [_dense(np.maximum(_bn_train(h, bn1), 0.0), d2) for h in in1]
    return _expected_stats(in1), _expected_stats(in2)


class _Block(L.Layer):
    """A custom layer that holds its BatchNormalization layer in an attribute."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(units)
        self.norm = L.BatchNormalization()

    def call(self, inputs, training=None):
        return self.norm(self.dense(inputs), training=training)


# ------------------------------------------------------------------ statistics


def test_two_bn_in_sequence_uneven_last_batch_numpy_input():
    model = _two_bn_mlp()
    x = _data(50)  # batches of 16, 16, 16 and 2
    seen = update_bn(model, x, batch_size=16, verbose=0)
    assert seen == 50
    expected1, expected2 = _two_bn_expected(model, x, 16)
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)
    # The weighting is by batch size: an unweighted mean of the 4 batch means differs.
    h = _dense(_f64(x), model.get_layer("d1"))
    unweighted = np.mean([b.mean(0) for b in _batches(h, 16)], axis=0)
    assert not np.allclose(_stats(model.get_layer("bn1"))[0], unweighted, rtol=1e-3)


def test_result_is_cumulative_not_exponential_and_ignores_old_statistics():
    model = _two_bn_mlp()
    x = _data(64, seed=1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            _set_stats(layer, seed=5)
    update_bn(model, x, batch_size=16, verbose=0)
    # Equal batches: the moving mean is the plain data mean of the BN input.
    h = _dense(_f64(x), model.get_layer("d1"))
    np.testing.assert_allclose(_stats(model.get_layer("bn1"))[0], h.mean(0), rtol=RTOL, atol=ATOL)
    _assert_stats(model.get_layer("bn2"), _two_bn_expected(model, x, 16)[1])


def test_conv_channels_last_tf_data_x_y_elements():
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), L.Conv2D(4, 3, name="conv"), L.BatchNormalization(name="bn")]
    )
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(40, 6, 6, 3)) + 1.0).astype("float32")
    y = rng.normal(size=(40, 1)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    assert update_bn(model, ds, verbose=0) == 40
    conv = model.get_layer("conv")
    inputs = [_f64(conv(b)) for b in _batches(x, 16)]
    # tf_keras' fused kernel (the default for 4D inputs) folds in the unbiased batch variance.
    ddof = 0 if IS_KERAS_3 else 1
    _assert_stats(model.get_layer("bn"), _expected_stats(inputs, axes=(0, 1, 2), ddof=ddof))


@pytest.mark.parametrize("element", ["x", "x_tuple", "x_y", "x_y_w"])
def test_tf_data_element_structures(element):
    model = _two_bn_mlp()
    x = _data(48, seed=3)
    y = np.zeros((48, 5), "float32")
    w = np.ones((48,), "float32")
    tensors = {"x": x, "x_tuple": (x,), "x_y": (x, y), "x_y_w": (x, y, w)}[element]
    ds = tf.data.Dataset.from_tensor_slices(tensors).batch(12)
    assert update_bn(model, ds, verbose=0) == 48
    expected1, expected2 = _two_bn_expected(model, x, 12)
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)


def test_x_y_tuple_of_arrays_and_default_batch_size():
    model = _two_bn_mlp()
    x = _data(70, seed=4)
    y = np.zeros((70, 5), "float32")
    assert update_bn(model, (x, y), verbose=0) == 70
    expected1, expected2 = _two_bn_expected(model, x, 32)  # default batch size 32
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)


def test_tensor_input():
    model = _two_bn_mlp()
    x = _data(40, seed=5)
    assert update_bn(model, tf.constant(x), batch_size=10, verbose=0) == 40
    _assert_stats(model.get_layer("bn2"), _two_bn_expected(model, x, 10)[1])


_SequenceBase = keras.utils.PyDataset if IS_KERAS_3 else keras.utils.Sequence


class _Batches(_SequenceBase):
    def __init__(self, x, batch_size):
        super().__init__()
        self.x, self.batch_size = x, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        xb = self.x[i * self.batch_size : (i + 1) * self.batch_size]
        return xb, np.zeros((len(xb), 5), "float32")


def test_pydataset():
    model = _two_bn_mlp()
    x = _data(45, seed=6)
    assert update_bn(model, _Batches(x, 10), verbose=0) == 45
    expected1, expected2 = _two_bn_expected(model, x, 10)
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)


def test_python_generator():
    model = _two_bn_mlp()
    x = _data(36, seed=7)
    assert update_bn(model, (b for b in _batches(x, 12)), verbose=0) == 36
    _assert_stats(model.get_layer("bn2"), _two_bn_expected(model, x, 12)[1])


@pytest.mark.parametrize("kind", ["numpy", "tf_data", "pydataset"])
def test_steps_limits_the_batches(kind):
    model = _two_bn_mlp()
    x = _data(50, seed=8)
    data = {
        "numpy": x,
        "tf_data": tf.data.Dataset.from_tensor_slices(x).batch(16),
        "pydataset": _Batches(x, 16),
    }[kind]
    kwargs = {"batch_size": 16} if kind == "numpy" else {}
    assert update_bn(model, data, steps=2, verbose=0, **kwargs) == 32
    expected1, expected2 = _two_bn_expected(model, x[:32], 16)
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)


def test_infinite_dataset_needs_steps():
    model = _two_bn_mlp()
    x = _data(32, seed=9)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8).repeat()
    with pytest.raises(ValueError, match="steps"):
        update_bn(model, ds, verbose=0)
    assert update_bn(model, ds, steps=4, verbose=0) == 32
    _assert_stats(model.get_layer("bn2"), _two_bn_expected(model, x, 8)[1])


def test_nested_model():
    inner = keras.Sequential(
        [keras.Input((6,)), L.Dense(5, name="inner_dense"), L.BatchNormalization(name="inner_bn")],
        name="inner",
    )
    inputs = keras.Input((8,))
    h = L.Dense(6, name="d1")(inputs)
    h = L.BatchNormalization(name="bn1")(h)
    outputs = inner(h)
    model = keras.Model(inputs, outputs)
    x = _data(40, seed=10)
    update_bn(model, x, batch_size=16, verbose=0)
    d1, bn1 = model.get_layer("d1"), model.get_layer("bn1")
    in1 = [_dense(b, d1) for b in _batches(_f64(x), 16)]
    in2 = [_dense(_bn_train(h, bn1), inner.get_layer("inner_dense")) for h in in1]
    _assert_stats(bn1, _expected_stats(in1))
    _assert_stats(inner.get_layer("inner_bn"), _expected_stats(in2))


def test_custom_layer_holding_a_bn_attribute():
    block = _Block(6)
    model = keras.Sequential([keras.Input((8,)), block])
    x = _data(30, seed=11)
    update_bn(model, x, batch_size=8, verbose=0)
    expected = _expected_stats([_dense(b, block.dense) for b in _batches(_f64(x), 8)])
    _assert_stats(block.norm, expected)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_functional_model_with_dict_inputs(as_dataset):
    a = keras.Input((3,), name="a")
    b = keras.Input((4,), name="b")
    bn_a = L.BatchNormalization(name="bn_a")(a)
    h = L.Dense(5, name="dense")(L.Concatenate()([bn_a, b]))
    out = L.BatchNormalization(name="bn_out")(h)
    model = keras.Model({"a": a, "b": b}, out)
    rng = np.random.default_rng(12)
    xa = (rng.normal(size=(30, 3)) * 2 - 1).astype("float32")
    xb = (rng.normal(size=(30, 4)) + 3).astype("float32")
    data = {"a": xa, "b": xb}
    if as_dataset:
        data = tf.data.Dataset.from_tensor_slices(data).batch(8)
        assert update_bn(model, data, verbose=0) == 30
    else:
        assert update_bn(model, data, batch_size=8, verbose=0) == 30
    bn_a_layer = model.get_layer("bn_a")
    in_a = _batches(_f64(xa), 8)
    in_out = [
        _dense(np.concatenate([_bn_train(ha, bn_a_layer), hb], axis=1), model.get_layer("dense"))
        for ha, hb in zip(in_a, _batches(_f64(xb), 8))
    ]
    _assert_stats(bn_a_layer, _expected_stats(in_a))
    _assert_stats(model.get_layer("bn_out"), _expected_stats(in_out))


@pytest.mark.tf_only("Keras allows BatchNormalization(synchronized=True) on TensorFlow only")
def test_synchronized_bn_on_one_device():
    model = keras.Sequential(
        [keras.Input((8,)), L.Dense(6, name="d1"), L.BatchNormalization(synchronized=True)]
    )
    x = _data(40, seed=13)
    update_bn(model, x, batch_size=16, verbose=0)
    expected = _expected_stats([_dense(b, model.get_layer("d1")) for b in _batches(_f64(x), 16)])
    _assert_stats(model.layers[-1], expected)


@pytest.mark.tf_only("tf.distribute")
def test_model_built_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _two_bn_mlp()
        model.compile(optimizer="sgd", loss="mse")
    x = _data(32, seed=14)
    with strategy.scope():
        assert update_bn(model, x, batch_size=16, verbose=0) == 32
    expected1, expected2 = _two_bn_expected(model, x, 8)
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)


def test_renorm_layer_gets_cumulative_statistics():
    model = keras.Sequential(
        [keras.Input((8,)), L.BatchNormalization(renorm=True, momentum=0.7, name="bn")]
    )
    bn = model.get_layer("bn")
    renorm = [_np(v) for v in bn.non_trainable_variables if "renorm" in v.name]
    assert renorm  # renorm_mean / renorm_stddev exist
    x = _data(40, seed=15)
    update_bn(model, x, batch_size=16, verbose=0)
    _assert_stats(bn, _expected_stats(_batches(_f64(x), 16)))
    assert bn.momentum == 0.7
    after = [_np(v) for v in bn.non_trainable_variables if "renorm" in v.name]
    for before_value, after_value in zip(renorm, after):
        np.testing.assert_array_equal(before_value, after_value)


# ------------------------------------------------------------------ what must stay as it was


def _frozen_model():
    inputs = keras.Input((8,))
    h = L.Dense(6, name="d1")(inputs)
    h = L.BatchNormalization(momentum=0.9, name="bn1")(h)
    frozen_bn = L.BatchNormalization(momentum=0.7, name="bn_frozen")
    frozen_bn.trainable = False
    h2 = frozen_bn(h)
    frozen_parent = keras.Sequential(
        [keras.Input((6,)), L.Dense(4), L.BatchNormalization(momentum=0.6, name="bn_in_frozen")],
        name="frozen_parent",
    )
    frozen_parent.trainable = False
    reenabled_parent = keras.Sequential(
        [keras.Input((6,)), L.BatchNormalization(name="bn_reenabled")], name="reenabled_parent"
    )
    reenabled_parent.trainable = False
    reenabled_parent.layers[-1].trainable = True  # still frozen by its parent
    outputs = L.Concatenate()([frozen_parent(h2), reenabled_parent(h)])
    model = keras.Model(inputs, outputs)
    untouched = [
        frozen_bn,
        frozen_parent.get_layer("bn_in_frozen"),
        reenabled_parent.get_layer("bn_reenabled"),
    ]
    for i, layer in enumerate(untouched):
        _set_stats(layer, seed=20 + i)
    return model, untouched


def test_frozen_bn_layers_stay_untouched_and_attributes_are_restored():
    model, untouched = _frozen_model()
    before = [_stats(layer) for layer in untouched]
    all_bn = [layer for layer in _iter_bn(model)]
    momenta = {layer.name: layer.momentum for layer in all_bn}
    trainable = {layer.name: layer.trainable for layer in _all_layers(model)}
    x = _data(40, seed=16)
    update_bn(model, x, batch_size=16, verbose=0)
    for layer, (mean, var) in zip(untouched, before):
        np.testing.assert_array_equal(_np(layer.moving_mean), mean)
        np.testing.assert_array_equal(_np(layer.moving_variance), var)
    expected = _expected_stats([_dense(b, model.get_layer("d1")) for b in _batches(_f64(x), 16)])
    _assert_stats(model.get_layer("bn1"), expected)
    assert {layer.name: layer.momentum for layer in all_bn} == momenta
    assert {layer.name: layer.trainable for layer in _all_layers(model)} == trainable
    assert type(model.get_layer("bn1").momentum) is float


def test_a_model_whose_bn_layers_are_all_frozen_is_a_no_op():
    model, untouched = _frozen_model()
    model.trainable = False
    before = [_stats(layer) for layer in _iter_bn(model)]
    assert update_bn(model, _exploding_iterable(), verbose=0) == 0
    for layer, (mean, var) in zip(_iter_bn(model), before):
        np.testing.assert_array_equal(_np(layer.moving_mean), mean)
        np.testing.assert_array_equal(_np(layer.moving_variance), var)


def _all_layers(model):
    from keras_swa.backend import iter_layers

    return list(iter_layers(model))


def _iter_bn(model):
    return [layer for layer in _all_layers(model) if isinstance(layer, L.BatchNormalization)]


def test_every_other_weight_and_the_optimizer_state_are_bit_identical():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(16),
            L.BatchNormalization(name="bn1"),
            L.Dropout(0.5),
            L.Dense(3),
            L.BatchNormalization(name="bn2"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = _data(64, seed=17)
    model.fit(x, np.zeros((64, 3), "float32"), batch_size=16, epochs=1, verbose=0)
    bn_stats = {
        id(v)
        for name in ("bn1", "bn2")
        for v in (model.get_layer(name).moving_mean, model.get_layer(name).moving_variance)
    }
    others = [v for v in model.weights if id(v) not in bn_stats]
    opt_vars = model.optimizer.variables
    opt_vars = opt_vars() if callable(opt_vars) else opt_vars
    before = [_np(v) for v in others]
    before_opt = [_np(v) for v in opt_vars]
    before_bn = _stats(model.get_layer("bn1"))
    update_bn(model, x, batch_size=16, verbose=0)
    assert not np.array_equal(_stats(model.get_layer("bn1"))[0], before_bn[0])  # did update
    assert len(others) >= 8  # kernels, biases, gammas, betas (+ Keras 3 dropout seed state)
    for v, value in zip(others, before):
        np.testing.assert_array_equal(_np(v), value, err_msg=v.name)
    for v, value in zip(opt_vars, before_opt):
        np.testing.assert_array_equal(_np(v), value, err_msg=v.name)


def _exploding_iterable():
    def generate():
        raise AssertionError("update_bn read the data although there is nothing to update")
        yield  # pragma: no cover

    return generate()


def test_model_without_bn_is_a_no_op_that_reads_no_data():
    model = keras.Sequential([keras.Input((8,)), L.Dense(4), L.Dropout(0.5), L.Dense(2)])
    before = [_np(v) for v in model.weights]
    assert update_bn(model, _exploding_iterable(), verbose=0) == 0
    for v, value in zip(model.weights, before):
        np.testing.assert_array_equal(_np(v), value)


# ------------------------------------------------------------------ errors


def _snapshot_bn(model):
    return [(_np(layer.moving_mean), _np(layer.moving_variance)) for layer in _iter_bn(model)]


def _assert_bn_unchanged(model, snapshot):
    for layer, (mean, var) in zip(_iter_bn(model), snapshot):
        np.testing.assert_array_equal(_np(layer.moving_mean), mean)
        np.testing.assert_array_equal(_np(layer.moving_variance), var)
        assert layer.momentum in (0.9, 0.8)


def _prepared_two_bn_mlp():
    model = _two_bn_mlp()
    _set_stats(model.get_layer("bn1"), seed=30)
    _set_stats(model.get_layer("bn2"), seed=31)
    return model, _snapshot_bn(model)


@pytest.mark.parametrize(
    "data",
    [
        np.zeros((40, 5), "float32"),  # wrong feature size
        {"wrong": np.zeros((40, 8), "float32")},  # wrong structure
    ],
    ids=["shape", "structure"],
)
def test_data_that_does_not_fit_raises_and_leaves_statistics(data):
    model, snapshot = _prepared_two_bn_mlp()
    with pytest.raises(ValueError, match="Received: data="):
        update_bn(model, data, batch_size=16, verbose=0)
    _assert_bn_unchanged(model, snapshot)


def test_failure_mid_pass_leaves_statistics_untouched():
    model, snapshot = _prepared_two_bn_mlp()
    x = _data(32, seed=18)

    def generate():
        yield x[:16]
        yield x[16:]  # the statistics have been overwritten by now
        yield np.zeros((16, 5), "float32")

    with pytest.raises(ValueError, match="batch 3"):
        update_bn(model, generate(), verbose=0)
    _assert_bn_unchanged(model, snapshot)


@pytest.mark.parametrize(
    "data",
    [
        np.zeros((0, 8), "float32"),
        tf.data.Dataset.from_tensor_slices(np.zeros((0, 8), "float32")).batch(4),
        iter([]),
    ],
    ids=["numpy", "tf_data", "iterator"],
)
def test_empty_data_raises_and_leaves_statistics(data):
    model, snapshot = _prepared_two_bn_mlp()
    with pytest.raises(ValueError, match="no data|0 samples"):
        update_bn(model, data, verbose=0)
    _assert_bn_unchanged(model, snapshot)


def test_unsupported_data_type_raises():
    model, _ = _prepared_two_bn_mlp()
    with pytest.raises(ValueError, match="Received: data='not data'"):
        update_bn(model, "not data", verbose=0)


def test_unbuilt_model_raises():
    model = keras.Sequential([L.Dense(4), L.BatchNormalization()])
    with pytest.raises(ValueError, match="built"):
        update_bn(model, _data(8), verbose=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"verbose": 3}, "verbose=3"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    model = _two_bn_mlp()
    with pytest.raises(ValueError, match=match):
        update_bn(model, _data(8), **kwargs)


def test_batch_size_with_a_dataset_raises():
    model = _two_bn_mlp()
    ds = tf.data.Dataset.from_tensor_slices(_data(8)).batch(4)
    with pytest.raises(ValueError, match="batch_size=4"):
        update_bn(model, ds, batch_size=4, verbose=0)


# ------------------------------------------------------------------ speed and output


class _TraceCounter(L.Layer):
    """Identity layer that counts how often its `call` runs: once per trace inside tf.function."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, inputs):
        self.calls += 1
        return inputs


def test_forward_pass_is_traced_once_plus_once_for_an_uneven_last_batch():
    counter = _TraceCounter()
    model = keras.Sequential([keras.Input((8,)), L.Dense(4), counter, L.BatchNormalization()])
    counter.calls = 0
    assert update_bn(model, _data(50), batch_size=8, verbose=0) == 50  # 6 batches of 8, 1 of 2
    assert 1 <= counter.calls <= 2
    counter.calls = 0
    # A later call reuses the model's compiled pass: batches of 8 were traced already.
    update_bn(model, _data(48), batch_size=8, verbose=0)
    assert counter.calls == 0


def test_verbose_shows_a_progress_bar(capsys):
    model = _two_bn_mlp()
    update_bn(model, _data(40), batch_size=10, verbose=1)
    assert "4/4" in capsys.readouterr().out
    update_bn(model, _data(40), batch_size=10, verbose=0)
    assert capsys.readouterr().out == ""
    update_bn(model, _data(40), batch_size=10)  # "auto": captured output is not interactive
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------ one trace, reused


def test_repeated_calls_trace_the_model_once_and_stay_exact():
    counter = _TraceCounter()
    inputs = keras.Input((3,))
    bn = L.BatchNormalization()
    model = keras.Model(inputs, bn(counter(inputs)))
    rng = np.random.RandomState(0)
    for call in range(4):
        x = rng.normal(loc=call, scale=1 + call, size=(64, 3)).astype("float32")
        update_bn(model, x, batch_size=16, verbose=0)
        # Each call's result is that call's data, however the pass was traced.
        mean, var = _expected_stats(_batches(x.astype(np.float64), 16))
        np.testing.assert_allclose(_np(bn.moving_mean), mean, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(_np(bn.moving_variance), var, rtol=RTOL, atol=ATOL)
    # Four calls with equal batch shapes: one trace (Keras may call `call` once more to build).
    assert counter.calls <= 2, counter.calls
    traced = counter.calls
    # A different model gets its own pass; the first model's pass is still reused afterwards.
    other = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    update_bn(other, x, batch_size=16, verbose=0)
    update_bn(model, x, batch_size=16, verbose=0)
    assert counter.calls == traced


def test_the_reused_pass_does_not_keep_the_model_alive():
    import gc
    import weakref

    model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.BatchNormalization()])
    update_bn(model, np.ones((8, 3), "float32"), batch_size=4, verbose=0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ call_fn: a custom forward pass


def _scaled_half(model, x):
    """Feeds the model a transformed selection of a dict input: `0.5 * x["main"] + 1`."""
    return model(x["main"] * 0.5 + 1.0, training=True)


def _dict_data(n, seed):
    rng = np.random.default_rng(seed)
    # "extra" is ignored by `_scaled_half`: the default pass could not run on this data.
    return {"main": _data(n, seed=seed), "extra": rng.normal(size=(n, 2)).astype("float32")}


def test_call_fn_statistics_are_those_of_what_it_feeds_the_bn_layers():
    model = _two_bn_mlp()
    data = _dict_data(50, seed=21)  # batches of 16, 16, 16 and 2
    assert update_bn(model, data, batch_size=16, verbose=0, call_fn=_scaled_half) == 50
    fed = _f64(data["main"]) * 0.5 + 1.0  # what the custom call gives the model, in numpy
    expected1, expected2 = _two_bn_expected(model, fed, 16)
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)
    # ... and not the statistics of the untransformed inputs.
    assert not np.allclose(_stats(model.get_layer("bn1"))[0], _two_bn_expected(
        model, _f64(data["main"]), 16)[0][0], rtol=1e-2)


def test_call_fn_and_default_pass_never_share_a_cached_pass():
    model = _two_bn_mlp()
    x = _data(32, seed=22)
    bn1 = model.get_layer("bn1")
    d1 = model.get_layer("d1")

    def expected_mean(inputs):
        return np.mean([_dense(b, d1).mean(0) for b in _batches(inputs, 16)], axis=0)

    update_bn(model, x, batch_size=16, verbose=0)  # default pass first: cached for the model
    np.testing.assert_allclose(_stats(bn1)[0], expected_mean(_f64(x)), rtol=RTOL, atol=ATOL)
    double = lambda m, b: m(b * 2.0, training=True)  # noqa: E731
    update_bn(model, x, batch_size=16, verbose=0, call_fn=double)
    np.testing.assert_allclose(_stats(bn1)[0], expected_mean(_f64(x) * 2), rtol=RTOL, atol=ATOL)
    # Another call_fn on the same model is not served by the first one's pass.
    triple = lambda m, b: m(b * 3.0, training=True)  # noqa: E731
    update_bn(model, x, batch_size=16, verbose=0, call_fn=triple)
    np.testing.assert_allclose(_stats(bn1)[0], expected_mean(_f64(x) * 3), rtol=RTOL, atol=ATOL)
    # The default path afterwards is unchanged.
    update_bn(model, x, batch_size=16, verbose=0)
    np.testing.assert_allclose(_stats(bn1)[0], expected_mean(_f64(x)), rtol=RTOL, atol=ATOL)
    _assert_stats(model.get_layer("bn2"), _two_bn_expected(model, x, 16)[1])


def test_the_same_call_fn_is_traced_once():
    counter = _TraceCounter()
    model = keras.Sequential([keras.Input((8,)), L.Dense(4), counter, L.BatchNormalization()])
    update_bn(model, _data(32), batch_size=8, verbose=0, call_fn=_scaled_half_plain)
    counter.calls = 0
    update_bn(model, _data(32, seed=3), batch_size=8, verbose=0, call_fn=_scaled_half_plain)
    assert counter.calls == 0
    # A bound method is a new object at each access, equal to the last: reused as well.
    caller = _Caller(0.5)
    update_bn(model, _data(32), batch_size=8, verbose=0, call_fn=caller.forward)
    counter.calls = 0
    update_bn(model, _data(32), batch_size=8, verbose=0, call_fn=caller.forward)
    assert counter.calls == 0


def _scaled_half_plain(model, x):
    return model(x * 0.5, training=True)


class _Caller:
    def __init__(self, scale):
        self.scale = scale

    def forward(self, model, x):
        return model(x * self.scale, training=True)


def test_call_fn_that_fails_leaves_everything_as_it_was():
    model = _two_bn_mlp()
    for layer in (model.get_layer("bn1"), model.get_layer("bn2")):
        _set_stats(layer, seed=23)
    before = [_np(v) for v in model.weights]
    momenta = [model.get_layer(n).momentum for n in ("bn1", "bn2")]

    def broken(m, x):
        m(x, training=True)
        raise KeyError("no such input")

    # The error comes out as tf.function's tracing gives it (the type depends on autograph).
    with pytest.raises(Exception, match="no such input"):
        update_bn(model, _data(32), batch_size=16, verbose=0, call_fn=broken)
    for value, var in zip(before, model.weights):
        np.testing.assert_array_equal(_np(var), value)
    assert [model.get_layer(n).momentum for n in ("bn1", "bn2")] == momenta


@pytest.mark.parametrize("call_fn", [3, "model", [_scaled_half]])
def test_call_fn_must_be_callable(call_fn):
    with pytest.raises(ValueError, match=r"Received: call_fn="):
        update_bn(_two_bn_mlp(), _data(8), verbose=0, call_fn=call_fn)


@pytest.mark.tf_only("tf.distribute")
def test_call_fn_under_mirrored_strategy_gets_each_replicas_share():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _two_bn_mlp()
    data = _dict_data(32, seed=24)
    with strategy.scope():
        assert update_bn(model, data, batch_size=16, verbose=0, call_fn=_scaled_half) == 32
    fed = _f64(data["main"]) * 0.5 + 1.0
    expected1, expected2 = _two_bn_expected(model, fed, 8)  # each replica's 8 of 16
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)


def test_a_call_fn_closing_over_the_model_does_not_keep_it_alive():
    import gc
    import weakref

    model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.BatchNormalization()])

    def call_fn(m, x):
        return model(x, training=True)  # the closure holds the model

    update_bn(model, np.ones((8, 3), "float32"), batch_size=4, verbose=0, call_fn=call_fn)
    ref = weakref.ref(model)
    del model, call_fn
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ the JAX backend


@pytest.mark.jax_only
def test_jax_arrays_as_data_and_the_models_arrays_stay_alive():
    import jax.numpy as jnp

    model = _two_bn_mlp()
    before = [v.value for v in model.variables]  # the pass must not donate the model's arrays
    x = _data(50, seed=31)
    assert update_bn(model, (jnp.asarray(x), jnp.zeros((50, 1))), batch_size=16, verbose=0) == 50
    expected1, expected2 = _two_bn_expected(model, x, 16)
    _assert_stats(model.get_layer("bn1"), expected1)
    _assert_stats(model.get_layer("bn2"), expected2)
    for value in before:
        assert not value.is_deleted()
        np.asarray(value)


@pytest.mark.jax_only
def test_jax_update_bn_refuses_a_model_parallel_distribution():
    # DataParallel runs (tests/test_data_parallel.py, on 2 devices); other layouts are untested.
    import jax

    model = _two_bn_mlp()
    stats = [_np(v) for v in model.non_trainable_variables]
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices=jax.devices()[:1])
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh))
    )
    try:
        with pytest.raises(NotImplementedError, match="Received: distribution=ModelParallel"):
            update_bn(model, _data(8), verbose=0)
    finally:
        keras.distribution.set_distribution(None)
    for before, v in zip(stats, model.non_trainable_variables):
        np.testing.assert_array_equal(before, _np(v))
