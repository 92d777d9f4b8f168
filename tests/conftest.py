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


@pytest.fixture(autouse=True)
def _seed():
    from keras_swa.backend import keras

    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
