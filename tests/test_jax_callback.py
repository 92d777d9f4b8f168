"""The `keras_swa.SWA` callback in `model.fit` on Keras 3's JAX backend, checked with numpy.

Runs with `KERAS_BACKEND=jax` (the JAX pass of scripts/test.sh); tests/test_callback.py runs
there too. These tests add what is specific to JAX's stateless, jitted train step: the learning
rate the callback sets must be the one the next compiled step uses (read back from the weights
of a model whose every gradient is 1, so each step moves every weight by exactly `-lr`), the
captures must be the weights of the capture steps (recorded by a separate callback as NumPy
copies), and the BatchNorm statistics must be recomputed for the averaged weights.
"""

import numpy as np
import pytest

from keras_swa.backend import keras
from keras_swa.callback import SWA

pytestmark = pytest.mark.jax_only

N, BATCH = 64, 16  # 4 steps per epoch


def _unit_gradient_model(lr):
    """y = x @ W + b with x = 1 and loss mean(sum(y)): every gradient is 1, so a step is -lr."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, kernel_initializer="ones")])
    model.compile(
        keras.optimizers.SGD(lr),
        lambda y_true, y_pred: keras.ops.mean(keras.ops.sum(y_pred, axis=-1)),
    )
    return model


def _ones():
    return np.ones((N, 1), "float32"), np.zeros((N, 2), "float32")


class StepRecorder(keras.callbacks.Callback):
    """NumPy copies of the trainable weights after every batch callback, by optimizer step."""

    def __init__(self):
        super().__init__()
        self.steps = {}

    def on_train_batch_end(self, batch, logs=None):
        it = int(self.model.optimizer.iterations.numpy())
        self.steps[it] = [np.array(v.numpy(), np.float64) for v in self.model.trainable_variables]


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = {}

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = [
            np.array(v.numpy(), np.float64) for v in self.model.trainable_variables
        ]


def paper_cyclic_lr(i, a1, a2, c):
    """lr(i) = (1 - t(i)) a1 + t(i) a2, t(i) = (((i - 1) mod c) + 1) / c (Izmailov et al. 2018)."""
    t = (((i - 1) % c) + 1) / c
    return (1 - t) * a1 + t * a2


def _assert_model_is_mean(model, snapshots):
    for i, v in enumerate(model.trainable_variables):
        expected = np.mean([s[i] for s in snapshots], axis=0)
        np.testing.assert_allclose(np.asarray(v.numpy()), expected, rtol=1e-6, atol=1e-6)


def test_cyclic_step_schedule_is_the_rate_each_compiled_step_uses():
    x, y = _ones()
    a1, a2, c, start, lr0 = 0.05, 0.005, 3, 5, 0.1
    model = _unit_gradient_model(lr0)
    swa = SWA(start_step=start, cycle_unit="step", cycle_length=c, swa_lr=a1, swa_lr_min=a2,
              verbose=0)
    rec = StepRecorder()
    model.fit(x, y, batch_size=BATCH, epochs=4, callbacks=[swa, rec], verbose=0, shuffle=False)
    total = 4 * N // BATCH
    assert sorted(rec.steps) == list(range(1, total + 1))
    kernel = {it: w[0][0, 0] for it, w in rec.steps.items()}
    kernel[0] = 1.0
    for it in range(1, total + 1):
        i = it - start
        expected = lr0 if i < 1 else paper_cyclic_lr(i, a1, a2, c)
        used = kernel[it - 1] - kernel[it]  # every gradient is 1
        assert used == pytest.approx(expected, rel=1e-4, abs=1e-6), (it, used, expected)
    capture_steps = [it for it in range(start + 1, total + 1) if (it - start) % c == 0]
    assert [step for _, step, _ in swa.captures] == capture_steps
    assert [lr for _, _, lr in swa.captures] == pytest.approx([a2] * len(capture_steps))
    assert int(swa.averaged.n_averaged.numpy()) == len(capture_steps)
    _assert_model_is_mean(model, [rec.steps[it] for it in capture_steps])


def test_cyclic_epoch_cycles_reach_the_compiled_steps_without_other_callbacks():
    # Only epoch-end reads here: nothing but SWA itself syncs the JAX state within an epoch.
    x, y = _ones()
    a1, a2, lr0 = 0.04, 0.004, 0.1
    steps_per_epoch = N // BATCH
    model = _unit_gradient_model(lr0)
    swa = SWA(start_epoch=1, cycle_length=2, swa_lr=a1, swa_lr_min=a2, verbose=0)
    rec = EpochRecorder()
    model.fit(x, y, batch_size=BATCH, epochs=5, callbacks=[swa, rec], verbose=0, shuffle=False)
    c = 2 * steps_per_epoch
    rates = [
        lr0 if it - steps_per_epoch < 1 else paper_cyclic_lr(it - steps_per_epoch, a1, a2, c)
        for it in range(1, 5 * steps_per_epoch + 1)
    ]
    for epoch, weights in rec.epochs.items():
        expected = 1.0 - np.sum(rates[: (epoch + 1) * steps_per_epoch])
        np.testing.assert_allclose(weights[0], np.full((1, 2), expected), rtol=1e-6, atol=1e-6)
    assert [e for e, _, _ in swa.captures] == [2, 4]
    _assert_model_is_mean(model, [rec.epochs[2], rec.epochs[4]])


def test_epoch_cycles_constant_lr_and_batchnorm_for_the_average():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(N, 5)) * 2.0 + 1.0).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Activation("relu")(h)))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    bn_batch = 20  # 20, 20, 20 and an uneven 4
    swa = SWA(start_epoch=2, cycle_length=2, swa_lr=0.02, bn_data=x, bn_batch_size=bn_batch,
              verbose=0)
    rec = EpochRecorder()
    history = model.fit(x, y, batch_size=BATCH, epochs=7, callbacks=[swa, rec], verbose=0)
    assert [epoch for epoch, _, _ in swa.captures] == [3, 5]
    np.testing.assert_allclose(history.history["learning_rate"], [0.05] * 2 + [0.02] * 5,
                               rtol=1e-6)
    assert history.history["swa_n"] == [0, 0, 0, 1, 1, 2, 2]
    _assert_model_is_mean(model, [rec.epochs[3], rec.epochs[5]])
    # The BN layer's inputs under the averaged weights, in numpy.
    kernel, bias = (np.asarray(w.numpy(), np.float64) for w in model.get_layer("dense_in").weights)
    h = x.astype(np.float64) @ kernel + bias
    batches = [h[i : i + bn_batch] for i in range(0, N, bn_batch)]
    sizes = np.array([len(b) for b in batches], np.float64)
    mean = sizes @ np.array([b.mean(axis=0) for b in batches]) / N
    var = sizes @ np.array([b.var(axis=0) for b in batches]) / N
    bn = model.get_layer("bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean.numpy()), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance.numpy()), var, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.9


def test_steps_per_execution_step_captures_and_rate():
    x, y = _ones()
    model = _unit_gradient_model(0.1)
    model.compile(
        keras.optimizers.SGD(0.1),
        lambda y_true, y_pred: keras.ops.mean(keras.ops.sum(y_pred, axis=-1)),
        steps_per_execution=2,
    )
    swa = SWA(cycle_unit="step", cycle_length=2, start_step=2, swa_lr=0.03, verbose=0)
    rec = StepRecorder()
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[swa, rec], verbose=0, shuffle=False)
    assert sorted(rec.steps) == [2, 4, 6, 8]  # one batch callback per execution of 2 steps
    for it, weights in rec.steps.items():
        expected = 1.0 - 0.1 * min(it, 2) - 0.03 * max(it - 2, 0)
        np.testing.assert_allclose(weights[0], np.full((1, 2), expected), rtol=1e-6, atol=1e-6)
    assert [step for _, step, _ in swa.captures] == [4, 6, 8]
    _assert_model_is_mean(model, [rec.steps[it] for it in (4, 6, 8)])
    with pytest.raises(ValueError, match="cycle_length=3"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  callbacks=[SWA(cycle_unit="step", cycle_length=3, verbose=0)])


def test_a_model_parallel_distribution_with_batchnorm_is_refused_before_training():
    # DataParallel runs (tests/test_data_parallel.py, on 2 devices); other layouts are untested.
    import jax

    x = np.ones((N, 5), "float32")
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(2), keras.layers.BatchNormalization()]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [np.array(v.numpy()) for v in model.variables]
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices=jax.devices()[:1])
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh))
    )
    try:
        with pytest.raises(NotImplementedError, match="Received: distribution=ModelParallel"):
            model.fit(x, np.zeros((N, 2), "float32"), epochs=1, verbose=0,
                      callbacks=[SWA(bn_data=x, verbose=0)])
    finally:
        keras.distribution.set_distribution(None)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, np.asarray(v.numpy()))


def test_export_dir_serves_the_averaged_model_with_its_batchnorm_statistics(tmp_path):
    # fit on JAX with SWA + bn_data + export_dir; the SavedModel (loaded with TensorFlow) must
    # compute the model's predictions, and both must be the numpy forward pass of the numpy
    # mean of the captures with numpy BatchNorm statistics, at two batch sizes.
    import tensorflow as tf

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(N, 5)) * 2.0 + 1.0).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    inputs = keras.Input((5,), name="features")
    h = keras.layers.Dense(6, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)
    outputs = keras.layers.Dense(1, name="dense_out")(keras.layers.Activation("relu")(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    path = str(tmp_path / "export" / "swa_model")
    swa = SWA(start_epoch=1, swa_lr=0.02, bn_data=x, bn_batch_size=N, export_dir=path, verbose=0)
    rec = EpochRecorder()
    model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=[swa, rec], verbose=0)
    assert [epoch for epoch, _, _ in swa.captures] == [1, 2]
    _assert_model_is_mean(model, [rec.epochs[1], rec.epochs[2]])
    # numpy: the averaged weights, BN statistics of the whole data (one batch of N), forward.
    k_in, b_in, gamma, beta, k_out, b_out = (
        np.mean([rec.epochs[e][i] for e in (1, 2)], axis=0) for i in range(6)
    )
    h = x.astype(np.float64) @ k_in + b_in
    mean, var = h.mean(axis=0), h.var(axis=0)
    epsilon = model.get_layer("bn").epsilon

    def forward(batch):
        z = batch.astype(np.float64) @ k_in + b_in
        z = np.maximum(gamma * (z - mean) / np.sqrt(var + epsilon) + beta, 0.0)
        return z @ k_out + b_out

    serve = tf.saved_model.load(path).signatures["serving_default"]
    for batch in (x[:3], x[10:27]):
        served = serve(features=tf.constant(batch))["output_0"].numpy()
        predicted = np.asarray(model.predict(batch, verbose=0))
        np.testing.assert_allclose(served, predicted, atol=1e-5)
        np.testing.assert_allclose(served, forward(batch), rtol=1e-4, atol=1e-4)
