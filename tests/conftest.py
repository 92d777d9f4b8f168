"""Test set-up shared by every test file: quiet TensorFlow, two logical CPU devices, seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices so that distribution tests can build a 2-replica MirroredStrategy.
# This must happen before TensorFlow initialises its devices, i.e. at import time.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # devices already initialised by an earlier import
    pass


if os.environ.get("KERAS_SWA_TEST_INSTALLED") == "1":
    import keras_swa

    assert "site-packages" in keras_swa.__file__, (
        "The tests must import the installed keras_swa wheel, not the source tree; got "
        + keras_swa.__file__
    )


def pytest_collection_modifyitems(config, items):
    """Skips `tf_only` tests off TensorFlow and `jax_only` tests off JAX, naming why."""
    from keras_swa.backend import backend_name

    current = backend_name()
    for item in items:
        tf_only = item.get_closest_marker("tf_only")
        if tf_only is not None and current != "tensorflow":
            reason = tf_only.args[0] if tf_only.args else tf_only.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"TensorFlow only ({reason}); backend is {current}"))
        if item.get_closest_marker("jax_only") is not None and current != "jax":
            item.add_marker(pytest.mark.skip(reason=f"tests the JAX backend; backend is {current}"))


@pytest.fixture(autouse=True)
def _seed():
    from keras_swa.backend import keras

    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
