"""TensorFlow, imported where keras_swa first needs it, so that JAX users need not install it.

On the TensorFlow backend and with tf_keras, Keras has already imported TensorFlow, and `tf`
here is that module. On Keras 3's JAX backend keras_swa runs without TensorFlow installed; only
what reads or writes TensorFlow's own formats needs it there, and imports it when called:
`export_saved_model` and `SWA(export_dir=...)` (through jax2tf), `average_checkpoints` of
`tf.train.Checkpoint` prefixes, and remote (`gs://`, ...) paths. Without TensorFlow those raise an
`ImportError` that says what to install.

`is_instance` answers without importing TensorFlow: a value cannot be a `tf.data.Dataset` or a
`tf.Tensor` unless TensorFlow has been imported by someone already.
"""

import importlib
import importlib.util
import sys

__all__ = ["INSTALL_HINT", "available", "is_instance", "tf"]

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


def is_instance(value, name):
    """Whether `value` is a `tf.<name>`, e.g. `"data.Dataset"` or `"Tensor"`.

    `False`, without importing TensorFlow, if nothing has imported it yet: no value can be a
    TensorFlow object then.

    Example:

    >>> import numpy as np
    >>> is_instance(np.zeros(3), "data.Dataset"), is_instance(tf.constant(1.0), "Tensor")
    (False, True)
    """
    cls = _loaded()
    if cls is None:
        return False
    for part in name.split("."):
        cls = getattr(cls, part)
    return isinstance(value, cls)
