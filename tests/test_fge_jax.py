"""`keras_swa.FGE` on the JAX backend: snapshots that survive `fit`'s donated buffers.

Runs with `KERAS_BACKEND=jax` (the JAX pass of scripts/test.sh); skipped on other backends. The
backend-neutral ensemble, export and error tests are in tests/test_fge.py, which the JAX pass
runs too.
"""

import numpy as np
import pytest

from keras_swa.backend import keras
from keras_swa.fge import FGE

pytestmark = pytest.mark.jax_only


def _model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4)(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Activation("relu")(h))
    return keras.Model(inputs, outputs)


def _np_forward(weights, x, epsilon):
    """Dense -> BN (inference, the member's own moving statistics) -> ReLU -> Dense -> softmax."""
    w1, b1, gamma, beta, mean, var, w2, b2 = [np.asarray(w, np.float64) for w in weights]
    h = np.maximum(gamma * (x @ w1 + b1 - mean) / np.sqrt(var + epsilon) + beta, 0.0)
    logits = h @ w2 + b2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_members_taken_during_fit_survive_later_steps_and_assignments():
    model = _model()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    fge = FGE(model, max_members=3)
    recorded = []

    def snapshot(epoch, logs):
        fge.add()
        recorded.append([np.array(w) for w in model.get_weights()])

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.integers(0, 2, size=32)
    callback = keras.callbacks.LambdaCallback(on_epoch_end=snapshot)
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[callback])
    assert len(fge) == 3
    # A member written into the model, then trained on: `fit` donates the model's buffers,
    # and the member keeps its own copy.
    fge.assign_member(0)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for member, weights in zip(fge.members, recorded[1:]):
        for snap, w in zip(member, weights):
            np.testing.assert_array_equal(np.asarray(snap.numpy()), w)
    # The ensemble is the numpy average of the recorded members' own forward passes.
    epsilon = model.layers[2].epsilon
    x64 = x[:5].astype(np.float64)
    expected = np.mean([_np_forward(w, x64, epsilon) for w in recorded[1:]], axis=0)
    before = [np.array(w) for w in model.get_weights()]
    np.testing.assert_allclose(fge.predict(x[:5]), expected, atol=1e-5)
    for b, w in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, w)


def test_ensemble_model_matches_predict():
    model = _model()
    fge = FGE(model)
    rng = np.random.default_rng(1)
    for _ in range(2):
        for v in model.trainable_variables:
            v.assign(v.numpy() + rng.normal(size=v.shape).astype("float32"))
        fge.add()
    x = rng.normal(size=(4, 3)).astype("float32")
    ensemble = fge.ensemble_model()
    np.testing.assert_allclose(np.asarray(ensemble(x)), fge.predict(x), atol=1e-6)
