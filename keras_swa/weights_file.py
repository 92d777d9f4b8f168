"""The `.weights.h5` file of `AveragedWeights.save_weights`: a Keras-style store on disk.

`AveragedWeights.save_own_variables(store)` fills a dict-like store (string keys, NumPy values)
as Keras 3 layers do; this module writes such a store to an HDF5 file, one dataset per key, and
reads it back into a dict. The file is written beside its destination under a temporary name and
moved into place with `os.replace`, so a crash while saving leaves either the old file or the new
one, never half of one.
"""

import os
import uuid

import numpy as np

from keras_swa.version import __version__

__all__ = ["SUFFIX", "WeightsFileMethods", "check_path", "read", "write"]

SUFFIX = ".weights.h5"


def _h5py():
    try:
        import h5py
    except ImportError as error:  # Keras 3 depends on h5py; tf_keras does not
        raise ImportError(
            "Saving and loading `.weights.h5` files needs h5py: `pip install h5py`."
        ) from error
    return h5py


def check_path(filepath):
    """`filepath` as a string, if it names a `.weights.h5` file (as Keras' `save_weights`)."""
    path = os.fspath(filepath)
    if not str(path).endswith(SUFFIX):
        raise ValueError(
            f"`filepath` must end in `{SUFFIX}`. Received: filepath={filepath!r}"
        )
    return path


def write(filepath, store):
    """Writes `store` (str -> array) to `filepath` atomically: a temporary file, then a rename."""
    h5py = _h5py()
    path = check_path(filepath)
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with h5py.File(temporary, "w") as file:
            file.attrs["keras_swa_version"] = __version__
            for key, value in store.items():
                file.create_dataset(key, data=np.asarray(value))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read(filepath):
    """The store saved in `filepath`, as a dict of NumPy arrays."""
    h5py = _h5py()
    path = check_path(filepath)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: {path!r}")
    with h5py.File(path, "r") as file:
        return {key: np.asarray(file[key]) for key in file.keys()}


class WeightsFileMethods:
    """`save_weights` / `load_weights` for a class with Keras' store protocol.

    The class provides `save_own_variables(store)` and `load_own_variables(store)` (which checks
    the store before it writes anything); these methods move that store to and from one
    `.weights.h5` file (`write`, `read`).
    """

    def save_weights(self, filepath):
        """Saves the state (`save_own_variables`) to a `.weights.h5` file.

        The file is written under a temporary name in the same folder and then renamed over
        `filepath`, so an interrupted save never leaves a half-written file. It works on every
        backend. Needs h5py (installed with Keras 3).

        Args:
            filepath: str or `os.PathLike`, ending in `.weights.h5`.
        """
        store = {}
        self.save_own_variables(store)
        write(filepath, store)

    def load_weights(self, filepath):
        """Restores the state saved by `save_weights` (checked first, as `load_own_variables`).

        Args:
            filepath: str or `os.PathLike`, ending in `.weights.h5`.
        """
        self.load_own_variables(read(filepath))
