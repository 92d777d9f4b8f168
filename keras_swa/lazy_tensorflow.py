"""TensorFlow, imported where keras_swa first needs it, so that JAX users need not install it.

On the TensorFlow backend and with tf_keras, Keras has already imported TensorFlow, and `tf`
here is that module. On Keras 3's JAX backend keras_swa runs without TensorFlow installed; only
what reads or writes TensorFlow's own formats needs it there, and imports it when called:
`export_saved_model` and `SWA(export_dir=...)` (through jax2tf), `average_checkpoints` of
`tf.train.Checkpoint` prefixes, and remote (`gs://`, ...) paths. Without TensorFlow those raise an
`ImportError` that says what to install.

`is_dataset` and `is_tensor` answer without importing TensorFlow: a value cannot be a
`tf.data.Dataset` or a `tf.Tensor` unless TensorFlow has been imported by someone already.
"""

import importlib
import importlib.util
import sys

__all__ = ["INSTALL_HINT", "available", "is_dataset", "is_tensor", "tf"]

INSTALL_HINT = "install it with `pip install tensorflow` (or `pip install tensorflow-cpu`)"


class _TensorFlow:
    """Stands in for the `tensorflow` module: imports it when an attribute is first read.

    Example:

    >>> from keras_swa.lazy_tensorflow import tf
    >>> tf.constant(2.0).dtype.name   # the first read imports TensorFlow
    'float32'
    """

    def __getattr__(self, name):
        if name.startswith("__"):
            # Probes such as `inspect`'s `__wrapped__` must not import TensorFlow; a loaded
            # module answers them (`tf.__version__`).
            module = _loaded()
            if module is None:
                raise AttributeError(name)
            return getattr(module, name)
        try:
            module = importlib.import_module("tensorflow")
        except ImportError as e:
            raise ImportError(
                f"This keras_swa feature needs TensorFlow (it uses `tf.{name}`), which cannot "
                f"be imported: {INSTALL_HINT}. On Keras 3's JAX backend the rest of keras_swa "
                "runs without it (see docs/backends.md). "
                f"Original error: {type(e).__name__}: {e}"
            ) from e
        value = getattr(module, name)
        setattr(self, name, value)  # later reads find it without `__getattr__`
        return value


tf = _TensorFlow()


def _loaded():
    """The `tensorflow` module if some code has imported it already, else `None`."""
    module = sys.modules.get("tensorflow")
    return module if module is not None and hasattr(module, "data") else None


def available():
    """Whether TensorFlow can be imported (without importing it).

    Example:

    >>> available()
    True
    """
    if _loaded() is not None:
        return True
    if "tensorflow" in sys.modules:  # a `None` entry: imports of it are blocked
        return False
    return importlib.util.find_spec("tensorflow") is not None


def is_dataset(value):
    """Whether `value` is a `tf.data.Dataset` (`False`, without importing, if TF is not loaded).

    Example:

    >>> import numpy as np
    >>> is_dataset(np.zeros(3))
    False
    """
    module = _loaded()
    return module is not None and isinstance(value, module.data.Dataset)


def is_tensor(value):
    """Whether `value` is a `tf.Tensor` (`False`, without importing, if TF is not loaded).

    Example:

    >>> import numpy as np
    >>> is_tensor(np.zeros(3))
    False
    """
    module = _loaded()
    return module is not None and isinstance(value, module.Tensor)
