"""Tests for `keras_swa.average_checkpoints`, checked against numpy means of the saved weights.

The weights are recorded with numpy when each checkpoint is saved; the expected average is their
numpy mean (float64), never anything computed by keras_swa.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_swa import AveragedWeights, average_checkpoints
from keras_swa.backend import IS_KERAS_3, backend_name, keras

L = keras.layers


def _model(units=6):
    return keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(units, name="d1"),
            L.BatchNormalization(name="bn"),
            L.Dense(3, name="d2"),
        ]
    )


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _perturb(model, rng):
    """Stands in for a stretch of training: new values for every weight, BN statistics too."""
    for v in model.weights:
        v.assign((rng.normal(size=v.shape) * 2 + 1).astype("float32"))


def _save(model, path, kind):
    if kind == "weights.h5":
        model.save_weights(path + ".weights.h5")
        return path + ".weights.h5"
    if kind == "tf.train.Checkpoint":
        return tf.train.Checkpoint(model=model).save(path)
    if kind == "tf_keras TF format":
        model.save_weights(path)
        return path
    raise AssertionError(kind)


def _saved_checkpoints(model, tmp_path, kinds, seed=0):
    """Saves one checkpoint per kind; returns the paths and the weights recorded at each save."""
    rng = np.random.default_rng(seed)
    paths, trainable, non_trainable = [], [], []
    for i, kind in enumerate(kinds):
        _perturb(model, rng)
        paths.append(_save(model, str(tmp_path / f"ckpt_{i}"), kind))
        trainable.append(_values(model.trainable_weights))
        non_trainable.append(_values(model.non_trainable_weights))
    _perturb(model, rng)  # the model holds none of the checkpoints' weights any more
    return paths, trainable, non_trainable


def _numpy_mean(records):
    return [np.mean(np.stack([r[i] for r in records]).astype(np.float64), axis=0)
            for i in range(len(records[0]))]


def _assert_close(variables, expected):
    assert len(variables) == len(expected)
    for v, e in zip(variables, expected):
        np.testing.assert_allclose(np.array(v.numpy()), e, rtol=1e-6, atol=1e-6)


def _assert_identical(variables, values):
    assert len(variables) == len(values)
    for v, value in zip(variables, values):
        np.testing.assert_array_equal(np.array(v.numpy()), value)


# On JAX (KERAS_BACKEND=jax) only Keras weights files can be read.
_KINDS = ["weights.h5"]
if backend_name() == "tensorflow":
    _KINDS += ["tf.train.Checkpoint"] + ([] if IS_KERAS_3 else ["tf_keras TF format"])


@pytest.mark.parametrize("kind", _KINDS)
def test_average_is_the_numpy_mean_of_the_saved_weights(kind, tmp_path):
    model = _model()
    paths, trainable, non_trainable = _saved_checkpoints(model, tmp_path, [kind] * 3)
    averaged = average_checkpoints(model, paths)
    assert isinstance(averaged, AveragedWeights)
    assert int(averaged.n_averaged) == 3
    _assert_close(model.trainable_weights, _numpy_mean(trainable))
    # Not averaged: the BN statistics are the last checkpoint's (update_bn recomputes them).
    _assert_identical(model.non_trainable_weights, non_trainable[-1])
    # The result really is the mean, not one of the checkpoints.
    assert not np.allclose(np.array(model.trainable_weights[0].numpy()), trainable[-1][0])


@pytest.mark.tf_only("TensorFlow checkpoints")
def test_mixed_formats_and_include_non_trainable(tmp_path):
    model = _model()
    paths, trainable, non_trainable = _saved_checkpoints(
        model, tmp_path, ["tf.train.Checkpoint", "weights.h5", "tf.train.Checkpoint", "weights.h5"]
    )
    averaged = average_checkpoints(model, paths, include_non_trainable=True)
    assert int(averaged.n_averaged) == 4
    _assert_close(model.trainable_weights, _numpy_mean(trainable))
    _assert_close(model.non_trainable_weights, _numpy_mean(non_trainable))


@pytest.mark.tf_only("TensorFlow checkpoints")
def test_a_checkpoint_holding_the_optimizer_leaves_the_optimizer_alone(tmp_path):
    model = _model()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    x = np.ones((8, 4), "float32")
    model.fit(x, np.ones((8, 3), "float32"), epochs=1, verbose=0)
    paths, trainable, _ = _saved_checkpoints(model, tmp_path, ["tf.train.Checkpoint"] * 2)
    model.fit(x, np.zeros((8, 3), "float32"), epochs=1, verbose=0)  # a different optimizer state
    optimizer_before = _values(model.optimizer.variables)
    average_checkpoints(model, paths)
    _assert_close(model.trainable_weights, _numpy_mean(trainable))
    _assert_identical(model.optimizer.variables, optimizer_before)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "paths, match",
    [
        ([], r"Received: paths=\[\]"),
        ("ckpt.weights.h5", r"must be a list .* Received: paths='ckpt.weights.h5'"),
        ([3], r"Received: paths\[0\]=3"),
    ],
)
def test_invalid_paths_raise(paths, match):
    with pytest.raises(ValueError, match=match):
        average_checkpoints(_model(), paths)


@pytest.mark.tf_only("TensorFlow checkpoints")
def test_a_missing_checkpoint_is_named_and_nothing_is_loaded(tmp_path):
    model = _model()
    paths, _, _ = _saved_checkpoints(model, tmp_path, ["weights.h5", "tf.train.Checkpoint"])
    before = _values(model.weights)
    for missing in (str(tmp_path / "nope.weights.h5"), str(tmp_path / "nope-3")):
        with pytest.raises(FileNotFoundError, match=r"Received: paths\[2\]=.*nope"):
            average_checkpoints(model, paths + [missing])
        _assert_identical(model.weights, before)


@pytest.mark.tf_only("TensorFlow checkpoints")
def test_a_directory_or_an_index_file_is_refused_with_the_right_path(tmp_path):
    model = _model()
    (prefix,) = _saved_checkpoints(model, tmp_path, ["tf.train.Checkpoint"])[0]
    with pytest.raises(ValueError, match="is a directory"):
        average_checkpoints(model, [str(tmp_path)])
    with pytest.raises(ValueError, match="not its `.index` file"):
        average_checkpoints(model, [prefix + ".index"])


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("other", ["wider", "shallower", "unrelated"])
def test_a_checkpoint_of_another_model_raises_naming_it_and_restores_the_model(
    kind, other, tmp_path
):
    model = _model()
    paths, _, _ = _saved_checkpoints(model, tmp_path, [kind, kind])
    if other == "wider":  # same layers, other shapes
        stranger = _model(units=7)
    elif other == "shallower":  # the model has a layer the checkpoint does not have
        stranger = keras.Sequential([keras.Input((4,)), L.Dense(6), L.BatchNormalization()])
    else:  # nothing in common
        stranger = keras.Sequential([keras.Input((5,)), L.Dense(1)])
    bad = _save(stranger, str(tmp_path / "stranger"), kind)
    before = _values(model.weights)
    # The first checkpoint is loaded (and folded in) before the bad one fails.
    with pytest.raises(ValueError, match=r"paths\[1\]=.*does not match the model") as info:
        average_checkpoints(model, [paths[0], bad, paths[1]])
    assert str(bad) in str(info.value)
    _assert_identical(model.weights, before)


def test_a_non_finite_checkpoint_raises_naming_it_and_restores_the_model(tmp_path):
    model = _model()
    paths, _, _ = _saved_checkpoints(model, tmp_path, ["weights.h5"] * 2)
    kernel = model.get_layer("d1").kernel
    saved = np.array(kernel.numpy())
    kernel.assign(np.full(kernel.shape, np.inf, "float32"))
    bad = _save(model, str(tmp_path / "diverged"), "weights.h5")
    kernel.assign(saved)
    before = _values(model.weights)
    with pytest.raises(FloatingPointError, match=r"paths\[2\]=.*diverged"):
        average_checkpoints(model, paths + [bad])
    _assert_identical(model.weights, before)


def test_an_unbuilt_model_raises(tmp_path):
    model = _model()
    (path,) = _saved_checkpoints(model, tmp_path, ["weights.h5"])[0]
    unbuilt = keras.Sequential([L.Dense(3)])
    with pytest.raises(ValueError, match="built"):
        average_checkpoints(unbuilt, [path])


@pytest.mark.jax_only
def test_tensorflow_checkpoints_are_refused_on_jax(tmp_path):
    model = _model()
    (path,) = _saved_checkpoints(model, tmp_path, ["weights.h5"])[0]
    prefix = str(tmp_path / "ckpt-1")
    open(prefix + ".index", "w").close()  # looks like a TF checkpoint; never read
    before = _values(model.weights)
    with pytest.raises(ValueError, match=r"TensorFlow checkpoints .* Received: .*ckpt-1"):
        average_checkpoints(model, [path, prefix])
    _assert_identical(model.weights, before)
