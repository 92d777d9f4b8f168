"""`export_saved_model` on the JAX backend: what differs from TensorFlow, and only that.

On JAX, Keras' public `keras.export.ExportArchive` writes the TensorFlow SavedModel itself: it
converts the serving function with `jax.experimental.jax2tf` (the model's variables become
`tf.Variable` copies, and a `None` batch dimension becomes a symbolic one, so the signature takes
any batch size, as on TensorFlow). keras_swa's `export_saved_model` therefore calls the same
archive on both backends; before it does, on JAX it needs

- TensorFlow and jax2tf importable (a JAX install need not have TensorFlow): otherwise a clear
  `ImportError` saying what to install, before anything is written;
- the model's variables current: during `fit`, Keras' JAX trainer keeps the training state
  outside the variables (see `keras_swa.backends.jax.sync`).
"""

import importlib

from keras_swa import lazy_tensorflow
from keras_swa.backends.jax import sync

__all__ = ["prepare_export", "require_tensorflow"]

_NEEDS = (
    "writes the SavedModel with `keras.export.ExportArchive`, which converts the model "
    "through jax2tf and needs TensorFlow"
)


def require_tensorflow(what, received):
    """Raises a clear `ImportError` now if TensorFlow is not installed (without importing it).

    `SWA(export_dir=...)` calls it at construction, so that a run that could not export its
    model at the end fails before it trains.
    """
    if not lazy_tensorflow.available():
        raise ImportError(
            f"{what} on the JAX backend {_NEEDS}, which is not installed: "
            f"{lazy_tensorflow.INSTALL_HINT}. Received: {received}"
        )


def prepare_export(model):
    """Checks that jax2tf can run and writes a running `fit`'s state into `model`'s variables."""
    for module in ("tensorflow", "jax.experimental.jax2tf"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"keras_swa.export_saved_model on the JAX backend {_NEEDS}: "
                f"{lazy_tensorflow.INSTALL_HINT}. "
                f"Received: an error importing {module!r}: {e}"
            ) from e
    sync(model)
