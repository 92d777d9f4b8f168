"""Export: write a model (e.g. the SWA-averaged one) as a TensorFlow SavedModel, atomically.

The last step of Stochastic Weight Averaging (Izmailov et al., "Averaging Weights Leads to Wider
Optima and Better Generalization", UAI 2018, arXiv 1803.05407) is to serve the averaged weights,
after the BatchNorm statistics have been recomputed for them. `export_saved_model` writes a
SavedModel with one serving signature that runs `model(inputs, training=False)`; the result loads
with `tf.saved_model.load`, TF-Serving and `saved_model_cli` alone, without keras_swa (or Keras).

It uses the public export API of each Keras version (`keras.export.ExportArchive`, which Keras 3
and tf_keras both provide) and adds what a deployment needs around it: the signature takes named
inputs (the model's input names), and the model is written into a temporary directory next to
`path` and renamed into place, so that `path` holds either nothing, the previous model or the
complete new one, never a half-written one. On Keras 3's JAX backend the archive converts the
model through jax2tf; the little that differs there is `keras_swa.backends.jax_export`.
"""

import contextlib
import io
import inspect
import os
import re
import shutil
import tempfile
import uuid

from keras_swa import backend, distribution
from keras_swa.backend import keras
from keras_swa.lazy_tensorflow import tf

__all__ = ["export_saved_model", "model_inputs"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def export_saved_model(
    model,
    path,
    overwrite=False,
    signature_name="serving_default",
    input_signature=None,
):
    """Writes `model` to `path` as a TensorFlow SavedModel with a serving signature.

    The signature computes `model(inputs, training=False)` (BatchNorm uses its moving statistics,
    dropout is off) and takes one named tensor per model input: the dict keys for a model called
    with a dict, otherwise the names of its `keras.Input`s. So a two-input functional model
    `keras.Model({"a": a, "b": b}, y)` is served as
    `loaded.signatures["serving_default"](a=..., b=...)`. Outputs are named as Keras'
    own export names them: `output_0` for a single tensor, `output_0`, `output_1`, ... for a list,
    and the keys of a dict.

    The SavedModel is written into a temporary directory in `path`'s parent directory (so on the
    same filesystem), flushed to disk, and then renamed to `path`. If anything fails before the
    rename, the temporary directory is deleted and `path` is untouched. With `overwrite=True` an
    existing model is first renamed to a backup name next to it, the new one renamed into place
    and the backup deleted; if the new one cannot be put in place, the old one is renamed back.
    (A POSIX filesystem cannot swap two directories in one step: a hard crash exactly between the
    two renames leaves the old model under a hidden `.NAME.old-*` name next to `path`. A hard crash
    while writing can leave a hidden `.NAME.tmp-*` directory; neither is ever at `path`.)

    `path` is a local filesystem path; `gs://` and other URLs are refused because the atomic
    rename this relies on is a local-filesystem operation. Missing parent directories are
    created.

    Args:
        model: A built Keras model (Keras 3 or tf_keras, matching `keras_swa.backend.keras`).
        path: `str` or `os.PathLike`, the directory to create. It must not exist, unless
            `overwrite=True` and it is a SavedModel directory (or empty).
        overwrite: Whether to replace an existing SavedModel at `path`. Defaults to `False`.
        signature_name: `str`, the name of the serving signature. A name other than
            `"serving_default"` is also exported as `"serving_default"`, since TF-Serving and
            `saved_model_cli` look for that one. Defaults to `"serving_default"`.
        input_signature: Optional. What the model is called with, as `tf.TensorSpec`s (or
            `keras.InputSpec`s): a single spec, a list of specs, or a dict of specs (the dict
            keys become the input names). A list holding one spec is read as that spec, as in
            `model.export`. Needed for models without symbolic inputs (subclassed models).
            Defaults to `None`: taken from `model.inputs`, with a `None` batch dimension.

    Under `tf.distribute.MultiWorkerMirroredStrategy` (in scope, or the model's
    `distribute_strategy`) every worker must call this function, but only the chief (task type
    `"chief"`, or worker 0 of a cluster without one) writes to `path`; the other workers write
    into a private temporary directory that they delete, and leave nothing behind.

    Returns:
        The absolute path of the SavedModel directory, as a `str`; `None` on a non-chief worker
        of a multi-worker strategy, which keeps nothing.

    Example:

    >>> import os, tempfile
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from keras_swa.backend import keras
    >>> inputs = keras.Input((3,), name="features")
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    >>> path = export_saved_model(model, os.path.join(tempfile.mkdtemp(), "model"))
    >>> serve = tf.saved_model.load(path).signatures["serving_default"]
    >>> x = np.ones((4, 3), "float32")
    >>> np.allclose(serve(features=x)["output_0"], model(x, training=False))
    True
    """
    backend.require_backend("export_saved_model")
    _check_model(model)
    if backend.backend_name() == "jax":
        from keras_swa.backends.jax_export import prepare_export

        prepare_export(model)
    if not isinstance(signature_name, str) or not signature_name.isidentifier():
        raise ValueError(
            "`signature_name` must be a non-empty string that is a valid Python identifier "
            f"(e.g. 'serving_default'). Received: signature_name={signature_name!r}"
        )
    chief = distribution.is_chief(distribution.find_strategy(model))
    if chief:
        path = _check_path(path, overwrite)
    structure, specs = _serving_inputs(model, input_signature)

    def serve(inputs):
        flat = [inputs[name] for name in specs]
        return model(tf.nest.pack_sequence_as(structure, flat), training=False)

    if not chief:
        # Saving may read synchronised variables, which all workers must do together: a
        # non-chief worker writes the same SavedModel into a private temporary directory and
        # deletes it (TensorFlow's multi-worker saving pattern).
        tmp = tempfile.mkdtemp(prefix="keras_swa-worker-export-")
        try:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(signature_name, serve, input_signature=[specs])
            _write_out(archive, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return None

    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise PermissionError(
            f"Cannot export to `path`: cannot create its parent directory {parent!r} ({e}). "
            f"Received: path={path!r}"
        ) from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"Cannot export to `path`: its parent directory {parent!r} is not writable. "
            f"Received: path={path!r}"
        )
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    except OSError as e:
        raise PermissionError(
            f"Cannot export to `path`: cannot create a temporary directory in its parent "
            f"directory {parent!r} ({e}). Received: path={path!r}"
        ) from e
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(signature_name, serve, input_signature=[specs])
        _write_out(archive, tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return path


def _check_path(path, overwrite):
    """Validates `path`; returns it as an absolute, normalised `str`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a string or an os.PathLike. Received: path={path!r}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"`path` must be a non-empty local path. Received: path={path!r}")
    if _SCHEME.match(path):
        raise ValueError(
            "`path` must be a local filesystem path: the export is made atomic by a rename, "
            "which remote filesystems (gs://, s3://, hdfs://, ...) do not provide. Export "
            f"locally, then copy. Received: path={path!r}"
        )
    path = os.path.abspath(path)
    if not os.path.basename(path):
        raise ValueError(f"`path` must name a directory to create. Received: path={path!r}")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(
            "`path` exists and is not a directory; a SavedModel is a directory. "
            f"Received: path={path!r}"
        )
    if os.path.isdir(path):
        if not overwrite:
            raise FileExistsError(
                "`path` already exists. Pass `overwrite=True` to replace the model there. "
                f"Received: path={path!r}"
            )
        if os.listdir(path) and not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise FileExistsError(
                "`path` is a non-empty directory that does not hold a SavedModel (no "
                "saved_model.pb); `overwrite=True` only replaces a SavedModel. "
                f"Received: path={path!r}"
            )
    parent = os.path.dirname(path)
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(
            f"Cannot export to `path`: {ancestor!r} on the way to it is a file, not a "
            f"directory. Received: path={path!r}"
        )
    return path


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a Keras model (`keras.Model`). Received: model={model!r} "
            f"of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            "`model` must be built before it can be exported: call it on data, or create it "
            "with `keras.Input`. "
            f"Received: model={model.name!r} (model.built=False)"
        )


def model_inputs(model):
    """The structure `model` is called with, as its symbolic inputs (`None` if it has none)."""
    try:
        structure = model.input  # Nested: dict or list as the functional model was built.
    except (AttributeError, ValueError):
        structure = None
    if structure is None:
        try:
            structure = model.inputs
        except (AttributeError, ValueError):
            structure = None
        if isinstance(structure, (list, tuple)) and len(structure) == 1:
            structure = structure[0]
    if isinstance(structure, (list, tuple, dict)) and not structure:
        return None
    return structure


def _to_tensor_spec(spec, name, batch_none):
    if not (hasattr(spec, "shape") and hasattr(spec, "dtype")):
        raise TypeError(
            "`input_signature` must hold `tf.TensorSpec` or `keras.InputSpec` objects (anything "
            f"with a shape and a dtype). Received an element: {spec!r}"
        )
    shape = spec.shape
    if shape is not None:
        shape = tf.TensorShape(shape)
        if batch_none and shape.rank:
            shape = tf.TensorShape([None] + shape.as_list()[1:])
    return tf.TensorSpec(shape, tf.as_dtype(spec.dtype or "float32"), name=name)


def _serving_inputs(model, input_signature):
    """Returns `(structure, specs)`: how to call the model, and the named signature inputs.

    `specs` maps each input name to its `tf.TensorSpec`, in the flattening order of `structure`.
    """
    inferred = input_signature is None
    structure = model_inputs(model) if inferred else input_signature
    if structure is None:
        raise ValueError(
            "Cannot infer the input signature of `model`: it has no symbolic inputs (a "
            "subclassed model, or a Sequential model without `keras.Input`). Pass "
            "`input_signature`, e.g. `input_signature=tf.TensorSpec((None, 8), tf.float32)`. "
            f"Received: model={model.name!r}, input_signature=None"
        )
    if isinstance(structure, (list, tuple)) and len(structure) == 1:
        structure = structure[0]
    flat = tf.nest.flatten(structure)
    if not flat:
        raise ValueError(f"`input_signature` is empty. Received: input_signature={structure!r}")
    if isinstance(structure, dict):
        names = [str(k) for k in sorted(structure)]  # tf.nest flattens dicts by sorted key.
    else:
        model_names = _model_input_names(model)
        names = []
        for i, item in enumerate(flat):
            item_name = getattr(item, "name", None)
            if isinstance(item_name, str) and item_name:
                names.append(item_name.split(":")[0])
            elif model_names and len(model_names) == len(flat):
                names.append(model_names[i])
            else:
                names.append("inputs" if len(flat) == 1 else f"inputs_{i}")
    if len(set(names)) != len(names):
        raise ValueError(
            "The inputs of the serving signature need distinct names; give them distinct "
            f"`name`s or pass a dict. Received names: {names}"
        )
    specs = {n: _to_tensor_spec(s, n, batch_none=inferred) for n, s in zip(names, flat)}
    return structure, specs


def _model_input_names(model):
    inputs = model_inputs(model)
    if inputs is None:
        return None
    return [getattr(t, "name", None) for t in tf.nest.flatten(inputs)]


def _write_out(archive, directory):
    """`archive.write_out(directory)`, without the endpoint listing it prints."""
    if "verbose" in inspect.signature(archive.write_out).parameters:  # Keras 3
        archive.write_out(directory, verbose=False)
    else:  # tf_keras prints unconditionally
        with contextlib.redirect_stdout(io.StringIO()):
            archive.write_out(directory)


def _replace_dir(new, path):
    """Renames directory `new` to `path`, replacing a directory at `path` if there is one."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    parent, name = os.path.split(path)
    backup = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
    os.rename(path, backup)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _fsync_tree(directory):
    """Flushes every file under `directory` (and the directories) to disk before the rename."""
    for root, _, files in os.walk(directory):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; nothing to flush there.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
