"""Tests for `keras_swa.fge.FGE`: ensemble predictions, the exported SavedModel, errors.

Backend-neutral except where marked `tf_only`: they run on TensorFlow (Keras 3 and tf_keras) and
in the JAX pass (`KERAS_BACKEND=jax`); JAX's own checks are in tests/test_fge_jax.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_swa.backend import keras
from keras_swa.batch_norm import update_bn
from keras_swa.fge import FGE
from keras_swa.schedules import Cyclic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Serves SavedModels in a fresh interpreter that has keras_swa on its path but cannot import it.
_LOADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_without_keras_swa.py")

STEPS_PER_EPOCH = 4


def _bn_classifier(logits=False):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((4,), name="features")
    h = keras.layers.Dense(8)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.Activation("relu")(h)
    outputs = keras.layers.Dense(3, activation=None if logits else "softmax")(h)
    return keras.Model(inputs, outputs)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 4)) * 2 + 1).astype("float32")
    y = (x[:, 0] > 1).astype("int32") + (x[:, 1] > 1).astype("int32")
    return x, y


def _trained_ensemble(cycles=3, logits=False):
    """Fits with a cyclic lr (one cycle per epoch), adding a member at each cycle end.

    Returns the model, the FGE, the recorded members' weights (numpy) and the inputs.
    """
    model = _bn_classifier(logits)
    schedule = Cyclic(swa_lr=0.1, swa_lr_min=0.01, cycle_length=STEPS_PER_EPOCH)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
    )
    fge = FGE(model)
    recorded = []

    def capture(epoch, logs):
        last_step = int(model.optimizer.iterations.numpy()) - 1
        assert schedule.is_cycle_end(last_step)  # the step just run was at swa_lr_min
        np.testing.assert_allclose(float(schedule(last_step)), 0.01, rtol=1e-6)
        fge.add()
        recorded.append(model.get_weights())

    x, y = _data()
    model.fit(x, y, batch_size=len(x) // STEPS_PER_EPOCH, epochs=cycles, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=capture)])
    return model, fge, recorded, x


def _member_predictions(model, recorded, x, bn_data=None, logits=False):
    """Each member's probabilities from a fresh copy of the model holding its weights."""
    predictions = []
    for weights in recorded:
        copy = keras.models.clone_model(model)
        copy.set_weights(weights)
        if bn_data is not None:
            update_bn(copy, bn_data, verbose=0)
        out = np.asarray(copy(x, training=False), np.float64)
        if logits:
            out = np.exp(out - out.max(-1, keepdims=True))
            out /= out.sum(-1, keepdims=True)
        predictions.append(out)
    return np.stack(predictions)


def test_predict_is_the_average_of_the_members_and_restores_the_model():
    model, fge, recorded, x = _trained_ensemble()
    assert len(fge) == 3
    members = _member_predictions(model, recorded, x[:10])
    # The members differ (and so do their BN statistics): the test can tell them apart.
    assert np.abs(members[0] - members[-1]).max() > 1e-3
    assert np.abs(recorded[0][4] - recorded[-1][4]).max() > 1e-4  # BN moving mean
    before = [v.numpy().copy() for v in model.variables]

    got = fge.predict(x[:10])
    np.testing.assert_allclose(got, members.mean(0), atol=1e-6)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())

    # With `bn_data`, every member's BN statistics are recomputed first.
    bn_x = x[:32]
    got_bn = fge.predict(x[:10], bn_data=bn_x, bn_batch_size=32)
    expected_bn = _member_predictions(model, recorded, x[:10], bn_data=bn_x).mean(0)
    np.testing.assert_allclose(got_bn, expected_bn, atol=1e-6)
    assert np.abs(got_bn - got).max() > 1e-4
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_from_logits_and_max_members():
    model, fge, recorded, x = _trained_ensemble(cycles=3, logits=True)
    expected = _member_predictions(model, recorded, x[:6], logits=True).mean(0)
    np.testing.assert_allclose(fge.predict(x[:6], from_logits=True), expected, atol=1e-6)

    small = FGE(model, max_members=2)
    for weights in recorded:
        model.set_weights(weights)
        small.add()
    assert len(small) == 2
    expected = _member_predictions(model, recorded[1:], x[:6], logits=True).mean(0)
    np.testing.assert_allclose(small.predict(x[:6], from_logits=True), expected, atol=1e-6)
    small.assign_member(0)
    for w, r in zip(model.get_weights(), recorded[1]):
        np.testing.assert_array_equal(w, r)
    small.reset()
    assert len(small) == 0


def test_exported_ensemble_serves_the_average_without_keras_swa(tmp_path):
    model, fge, recorded, x = _trained_ensemble(cycles=3)
    expected = _member_predictions(model, recorded, x[:7]).mean(0)
    path = fge.export_saved_model(str(tmp_path / "fge"))
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    np.save(tmp_path / "x.npy", x[:7])
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="")
    jobs = [{"path": path, "inputs": {"features": str(tmp_path / "x.npy")},
             "result": str(tmp_path / "o.npz")}]
    proc = subprocess.run(
        [sys.executable, _LOADER, json.dumps(jobs)],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0 and "LOADER OK" in proc.stdout, proc.stdout + proc.stderr
    served = dict(np.load(tmp_path / "o.npz"))
    assert set(served) == {"output_0"}
    np.testing.assert_allclose(served["output_0"], expected, atol=1e-5)
    # Exporting again needs `overwrite=True`.
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fge.export_saved_model(path)
    assert fge.export_saved_model(path, overwrite=True) == path


@pytest.mark.tf_only("tf.train.Checkpoint carries tf.Variables")
def test_checkpoint_round_trip(tmp_path):
    model, fge, recorded, _ = _trained_ensemble(cycles=2)
    path = tf.train.Checkpoint(fge=fge).save(str(tmp_path / "ckpt"))
    restored = FGE(model)
    for _ in range(2):
        restored.add()  # the same structure, then overwritten by the checkpoint
    model.set_weights([np.zeros_like(w) for w in recorded[0]])
    tf.train.Checkpoint(fge=restored).restore(path).assert_existing_objects_matched()
    for index, weights in enumerate(recorded):
        restored.assign_member(index)
        for w, r in zip(model.get_weights(), weights):
            np.testing.assert_array_equal(w, r)


def test_weights_file_round_trip_restores_every_member(tmp_path):
    model, fge, recorded, x = _trained_ensemble(cycles=3)
    expected = fge.predict(x[:8])
    path = tmp_path / "fge.weights.h5"
    fge.save_weights(path)
    restored = FGE(model)
    restored.add()  # replaced by the file's members
    model.set_weights([np.zeros_like(w) for w in recorded[0]])
    restored.load_weights(path)
    assert len(restored) == 3
    for index, weights in enumerate(recorded):
        restored.assign_member(index)
        for w, r in zip(model.get_weights(), weights):
            np.testing.assert_array_equal(w, r)
    model.set_weights(recorded[-1])
    np.testing.assert_allclose(restored.predict(x[:8]), expected, rtol=1e-6, atol=1e-7)


def test_a_mismatched_store_is_refused_and_keeps_the_members(tmp_path):
    model, fge, recorded, _ = _trained_ensemble(cycles=2)
    store = {}
    fge.save_own_variables(store)
    few = FGE(model, max_members=1)
    few.add()
    kept = [np.array(s) for s in few.members[0]]
    with pytest.raises(ValueError, match="max_members=1"):
        few.load_own_variables(store)
    keras.utils.set_random_seed(5)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="shapes"):
        FGE(other).load_own_variables(store)
    with pytest.raises(ValueError, match="not readable"):
        few.load_own_variables({"fingerprint": store["fingerprint"][:5]})
    swag_like = {"fingerprint": np.frombuffer(b'{"format": "keras_swa.SWAG"}', np.uint8)}
    with pytest.raises(ValueError, match="not saved by `FGE.save_own_variables`"):
        few.load_own_variables(swag_like)
    with pytest.raises(ValueError, match="must end in `.weights.h5`"):
        few.save_weights(tmp_path / "fge.h5")
    assert list(tmp_path.iterdir()) == []
    assert len(few) == 1
    for s, k in zip(few.members[0], kept):
        np.testing.assert_array_equal(np.array(s), k)


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="Received: model="):
        FGE("model")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="built=False"):
        FGE(unbuilt)
    model = _bn_classifier()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"Received: max_members={bad!r}"):
            FGE(model, max_members=bad)
    fge = FGE(model)
    with pytest.raises(ValueError, match="len=0"):
        fge.predict(np.ones((1, 4), "float32"))
    with pytest.raises(ValueError, match="len=0"):
        fge.export_saved_model(str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty")
    fge.add()
    with pytest.raises(IndexError, match="Received: index=1"):
        fge.assign_member(1)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="do not match"):
        fge.assign_member(0, other)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(np.ones((1, 3), "float32"))
    sub_fge = FGE(sub)
    sub_fge.add()
    np.testing.assert_allclose(
        sub_fge.predict(np.ones((2, 3), "float32")), np.asarray(sub(np.ones((2, 3)))), atol=1e-6
    )
    with pytest.raises(ValueError, match="symbolic inputs"):
        sub_fge.export_saved_model(str(tmp_path / "sub"))
