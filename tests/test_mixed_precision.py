"""SWA under mixed precision: fp32 averages, the policy's compute dtype in the exported model."""

import numpy as np
import pytest
import tensorflow as tf

from keras_swa.averaged_weights import AveragedWeights
from keras_swa.backend import IS_KERAS_3, keras
from keras_swa.callback import SWA


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.snaps = []

    def on_epoch_end(self, epoch, logs=None):
        self.snaps.append([v.numpy().astype(np.float64) for v in self.model.trainable_variables])


def test_swa_fit_under_mixed_precision(policy, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
    inputs = keras.Input((5,), name="features")
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8)(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.ReLU()(h))
    model = keras.Model(inputs, outputs)
    optimizer = keras.optimizers.SGD(0.05)
    if policy == "mixed_float16":
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer, "binary_crossentropy")
    rec = Recorder()
    path = str(tmp_path / "model")
    swa = SWA(start_epoch=1, swa_lr=0.02, bn_data=x, export_dir=path, verbose=0)
    model.fit(x, y, batch_size=16, epochs=4, callbacks=[swa, rec], verbose=0)

    assert all(a.dtype == tf.float32 for a in swa.averaged.averages)
    expected = [np.mean([s[i] for s in rec.snaps[1:]], axis=0) for i in range(len(rec.snaps[0]))]
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(np.asarray(v.numpy(), np.float64), e, rtol=1e-5, atol=1e-6)
    assert swa.captures and all(lr == pytest.approx(0.02) for _, _, lr in swa.captures)

    serve = tf.saved_model.load(path).signatures["serving_default"]
    served = serve(features=tf.constant(x[:4]))["output_0"]
    keras_out = model(x[:4], training=False)
    compute = keras.mixed_precision.Policy(policy).compute_dtype
    assert served.dtype == tf.as_dtype(keras_out.dtype) == tf.as_dtype(compute)
    np.testing.assert_allclose(
        np.asarray(served, np.float32), np.asarray(keras_out, np.float32), rtol=1e-2, atol=1e-2
    )


def test_bf16_model_variables_averaged_in_fp32_and_rounded_once():
    keras.mixed_precision.set_global_policy("bfloat16")
    try:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    kernel = model.layers[0].kernel
    assert kernel.dtype in ("bfloat16", tf.bfloat16)
    averaged = AveragedWeights(model)
    rng = np.random.default_rng(1)
    values = []
    for _ in range(5):
        v = tf.cast(rng.normal(size=kernel.shape).astype("float32"), tf.bfloat16)
        kernel.assign(v)
        values.append(v.numpy().astype(np.float64))
        averaged.update()
    mean = np.mean(values, axis=0)
    np.testing.assert_allclose(averaged.averages[0].numpy(), mean, rtol=1e-6, atol=1e-6)
    averaged.assign_to()
    # One rounding, fp32 mean -> bf16, not an average accumulated in bf16.
    np.testing.assert_array_equal(
        np.asarray(kernel.numpy(), np.float32),
        tf.cast(tf.constant(mean, tf.float32), tf.bfloat16).numpy().astype(np.float32),
    )
