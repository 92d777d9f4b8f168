"""Which Keras backend each public entry point runs on, and the clear refusal elsewhere.

Runs under every backend: on TensorFlow (Keras 3 and tf_keras) every entry point is constructed
or called normally; on JAX the entry points not ported to JAX must raise a `NotImplementedError`
naming the backend before computing anything; the PyTorch refusal is checked by making Keras
report "torch" (torch is not installed here).
"""

import numpy as np
import pytest

import keras_swa
from keras_swa import backend
from keras_swa.backend import keras

# Entry points that run on JAX (the rest must refuse it). Written out by hand, not read from
# keras_swa, so that a change of what is supported must change this test too.
JAX_SUPPORTED = {
    "AveragedWeights",
    "FGE",
    "SWA",
    "SWAG",
    "SwapAveragedWeights",
    "average_checkpoints",
    "export_saved_model",
    "schedules",
    "update_bn",
}


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return model


def _bn_model():
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()]
    )


def _make(name, tmp_path):
    """Constructs (or calls) the entry point `name` the way a user would."""
    x = np.ones((4, 3), "float32")
    if name == "AveragedWeights":
        return keras_swa.AveragedWeights(_model())
    if name == "SWA":
        return keras_swa.SWA(start_epoch=1, swa_lr=0.05, bn_data=x)
    if name == "SWAG":
        return keras_swa.SWAG(_model())
    if name == "FGE":
        return keras_swa.FGE(_model())
    if name == "SwapAveragedWeights":

        class _FakeSWA(keras.callbacks.Callback):
            averaged = None

        return keras_swa.SwapAveragedWeights(_FakeSWA())
    if name == "update_bn":
        return keras_swa.update_bn(_bn_model(), x, verbose=0)
    if name == "average_checkpoints":
        model = _model()
        path = str(tmp_path / "model.weights.h5")
        model.save_weights(path)
        return keras_swa.average_checkpoints(model, [path])
    if name == "export_saved_model":
        return keras_swa.export_saved_model(_model(), str(tmp_path / "exported"))
    if name == "schedules":
        return keras_swa.schedules.Cyclic(swa_lr=0.05, swa_lr_min=0.01, cycle_length=4)
    raise AssertionError(name)


ENTRY_POINTS = [
    "AveragedWeights",
    "SWA",
    "SWAG",
    "FGE",
    "SwapAveragedWeights",
    "update_bn",
    "average_checkpoints",
    "export_saved_model",
    "schedules",
]


def test_every_entry_point_is_listed():
    assert set(backend.SUPPORTED_BACKENDS) == set(ENTRY_POINTS)
    for name in ENTRY_POINTS:
        assert "tensorflow" in backend.SUPPORTED_BACKENDS[name], name


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_on_this_backend(name, tmp_path):
    current = backend.backend_name()
    if current == "tensorflow" or (current == "jax" and name in JAX_SUPPORTED):
        _make(name, tmp_path)  # must not raise
        return
    with pytest.raises(NotImplementedError) as info:
        _make(name, tmp_path)
    message = str(info.value)
    assert f"keras_swa.{name}" in message
    assert f"Received: backend={current!r}" in message
    assert "'tensorflow'" in message  # says what is supported
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_refuses_torch(name, tmp_path, monkeypatch):
    if not backend.IS_KERAS_3:
        pytest.skip("tf_keras has no backend to choose: it always runs on TensorFlow")
    monkeypatch.setattr(keras.config, "backend", lambda: "torch")
    with pytest.raises(NotImplementedError, match=r"Received: backend='torch'"):
        _make(name, tmp_path)


# Arguments that run on JAX, written out by hand as JAX_SUPPORTED is.
JAX_ARGUMENTS = {("SWA", "backup_dir"), ("SWA", "export_dir")}


def test_argument_backends_on_jax():
    for key, backends in backend.SUPPORTED_ARGUMENT_BACKENDS.items():
        assert "tensorflow" in backends, key
        assert ("jax" in backends) == (key in JAX_ARGUMENTS), key
    backend.require_argument_backend("SWA", "backup_dir", "/tmp/swa", backend="jax")
    with pytest.raises(NotImplementedError, match=r"Received: backup_dir='/tmp/swa'"):
        backend.require_argument_backend("SWA", "backup_dir", "/tmp/swa", backend="torch")


def test_require_backend_message():
    backend.require_backend("AveragedWeights", backend="tensorflow")
    with pytest.raises(NotImplementedError) as info:
        backend.require_backend("update_bn", backend="torch")
    assert str(info.value).startswith(
        "keras_swa.update_bn does not support the 'torch' Keras backend; it supports "
    )
    assert str(info.value).endswith("Received: backend='torch'")


def test_backend_name():
    if backend.IS_KERAS_3:
        assert backend.backend_name() == keras.config.backend()
    else:
        assert backend.backend_name() == "tensorflow"
