"""Averages a model's saved checkpoints after training: SWA after the fact.

Stochastic Weight Averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018, arXiv 1803.05407) averages the weights SGD visits. When the visits
were saved as checkpoints (one per epoch, say) and no average was kept during training, the same
equal-weight average can be computed from the files: `average_checkpoints` loads each checkpoint
into the model in turn and folds it into a `keras_swa.AveragedWeights`, so only one checkpoint is
in memory at a time besides the fp32 averages. The BatchNorm statistics are then recomputed for
the average with `keras_swa.update_bn`, as after any SWA run.

Readable formats: Keras weights files (`model.save_weights("x.weights.h5")`, tf_keras' `.h5`, a
`.keras` archive), read with `model.load_weights`; and TensorFlow checkpoints, read with
`tf.train.Checkpoint`: prefixes written by `tf.train.Checkpoint(model=model)` (what
`tf.train.CheckpointManager(...).checkpoints` lists) or with the model as the root object (tf_keras'
`model.save_weights("prefix")`, TensorFlow format). On Keras 3's JAX backend, which
`AveragedWeights` also runs on, Keras weights files are read and TensorFlow checkpoints refused.
"""

import math
import os

import numpy as np

from keras_swa import backend
from keras_swa.averaged_weights import AveragedWeights
from keras_swa.backend import keras
from keras_swa.lazy_tensorflow import tf

__all__ = ["average_checkpoints"]

# Files `model.load_weights` reads; anything else must be a TensorFlow checkpoint prefix.
_KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


def average_checkpoints(model, paths, include_non_trainable=False):
    """Writes the equal-weight average of saved checkpoints into a model.

    Loads every checkpoint of `paths` into `model` in turn, folds its weights into a
    `keras_swa.AveragedWeights` (the fp32 running mean: one checkpoint in memory at a time, never
    all of them) and finally writes the mean of all of them into the model. Call
    `keras_swa.update_bn(model, data)` afterwards: the BatchNorm statistics are not averaged
    (unless `include_non_trainable`), they are recomputed for the average.

    On success the averaged variables hold the mean; every other variable of the model holds
    the last checkpoint's value (as after `model.load_weights(paths[-1])`); the optimizer's
    variables are left as they were. If any checkpoint is missing, does not match the model or
    cannot be read, nothing is changed: the error names the path, and the model's weights (and
    its optimizer's) are restored to their values before the call. A checkpoint matches when
    it gives every averaged variable a value of its shape; values the model has no variable
    for (the optimizer's, extra layers') are ignored, as `model.load_weights` ignores them.

    Args:
        model: a built Keras model with the architecture the checkpoints were saved from.
        paths: a list of checkpoint paths, each a Keras weights file (`.weights.h5` from
            `model.save_weights`, tf_keras' `.h5`, a `.keras` archive) or a TensorFlow
            checkpoint prefix (`tf.train.Checkpoint(model=model).save(...)`'s return value, or
            tf_keras' `model.save_weights(prefix)`; the prefix, not its `.index` file). Formats
            may be mixed. Each checkpoint counts once.
        include_non_trainable: also average the non-trainable variables (BatchNorm moving
            statistics, ...), like `AveragedWeights(include_non_trainable=True)`.
            Defaults to `False`.

    Returns:
        The `keras_swa.AveragedWeights` holding the average: `n_averaged` is `len(paths)`; keep
        it to fold in more weights with `update()`, to checkpoint the average, or to `swap()`
        it in and out.

    Raises:
        ValueError: if `paths` is empty or not a list of paths, if the model is not built, or
            if a checkpoint does not match the model (naming the checkpoint).
        FileNotFoundError: if a checkpoint does not exist (naming it); nothing is loaded then.
        FloatingPointError: if a checkpoint holds NaN or infinite weights (naming it).

    Example:

    >>> import os, tempfile
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> folder = tempfile.mkdtemp()
    >>> paths = []
    >>> for epoch in range(3):  # stands in for training and saving once per epoch
    ...     _ = model.layers[0].kernel.assign(np.full((2, 1), float(epoch), "float32"))
    ...     paths.append(os.path.join(folder, f"epoch_{epoch}.weights.h5"))
    ...     model.save_weights(paths[-1])
    >>> averaged = average_checkpoints(model, paths)
    >>> int(averaged.n_averaged)
    3
    >>> np.asarray(model.layers[0].kernel).ravel().tolist()  # mean of 0, 1 and 2
    [1.0, 1.0]
    """
    backend.require_backend("average_checkpoints")
    checkpoints = _check_paths(paths)
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(
            "`average_checkpoints` needs a built Keras model with the checkpoints' architecture "
            "(call it on data, give it a `keras.Input`, or call `model.build(input_shape)`). "
            f"Received: model={model!r}"
        )
    averaged = AveragedWeights(model, include_non_trainable=include_non_trainable)
    targets = list(averaged.tracked_variables)
    # Everything a load may write: the model's weights, and its optimizer's variables (a
    # `tf.train.Checkpoint(model=model)` of a compiled model also holds the optimizer).
    optimizer = getattr(model, "optimizer", None)
    optimizer_variables = list(getattr(optimizer, "variables", None) or [])
    written = list(model.weights) + optimizer_variables
    backup = [_copy(v) for v in written]
    num_model_weights = len(written) - len(optimizer_variables)
    succeeded = False
    try:
        for index, (path, kind) in enumerate(checkpoints):
            _load(model, path, kind, index, targets)
            try:
                averaged.update()
            except FloatingPointError as e:
                raise FloatingPointError(f"Checkpoint paths[{index}]={path!r}: {e}") from e
        averaged.assign_to()
        succeeded = True
    finally:
        first = num_model_weights if succeeded else 0
        for variable, value in zip(written[first:], backup[first:]):
            variable.assign(value)
    return averaged


def _check_paths(paths):
    """Returns `[(path, kind)]` with kind `"keras"` or `"tf"`; raises before anything is read."""
    if isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(paths, (list, tuple)):
        raise ValueError(
            "`paths` must be a list of checkpoint paths (one checkpoint alone is not an "
            f"average: pass `[path]` to load just it). Received: paths={paths!r}"
        )
    if not paths:
        raise ValueError(
            "`paths` is empty: there is no checkpoint to average. Received: paths=[]"
        )
    checkpoints = []
    for index, path in enumerate(paths):
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(
                "Every element of `paths` must be a path (a string or `os.PathLike`). "
                f"Received: paths[{index}]={path!r}"
            )
        path = os.fspath(path)
        checkpoints.append((path, _kind(path, index)))
    if backend.backend_name() != "tensorflow":
        tf_checkpoints = [path for path, kind in checkpoints if kind == "tf"]
        if tf_checkpoints:
            raise ValueError(
                "TensorFlow checkpoints can only be read into a model on the TensorFlow "
                f"backend; on {backend.backend_name()!r} save `.weights.h5` files with "
                f"`model.save_weights`. Received: {tf_checkpoints[0]!r}"
            )
    return checkpoints


def _kind(path, index):
    if path.endswith(_KERAS_SUFFIXES):
        if not _exists(path):
            raise FileNotFoundError(
                f"Checkpoint not found: no file {path!r}. Received: paths[{index}]={path!r}"
            )
        return "keras"
    if _exists(path + ".index"):
        return "tf"
    if path.endswith(".index") and _exists(path):
        raise ValueError(
            "Pass a TensorFlow checkpoint's prefix, not its `.index` file: "
            f"{path[: -len('.index')]!r}. Received: paths[{index}]={path!r}"
        )
    if _isdir(path):
        raise ValueError(
            f"{path!r} is a directory, not a checkpoint: pass checkpoint prefixes, e.g. "
            "`tf.train.CheckpointManager(...).checkpoints` or `tf.train.latest_checkpoint(dir)`. "
            f"Received: paths[{index}]={path!r}"
        )
    if _exists(path):
        raise ValueError(
            f"{path!r} is neither a Keras weights file (`.weights.h5`, `.h5`, `.keras`) nor a "
            f"TensorFlow checkpoint prefix (no {path + '.index'!r}). "
            f"Received: paths[{index}]={path!r}"
        )
    raise FileNotFoundError(
        f"Checkpoint not found: no Keras weights file or TensorFlow checkpoint {path!r} (nor "
        f"{path + '.index'!r}). Received: paths[{index}]={path!r}"
    )


def _gfile(path):
    """`tf.io.gfile` where TensorFlow reads the files (its backend, remote `gs://` paths)."""
    if backend.backend_name() == "tensorflow" or "://" in path:
        return tf.io.gfile
    return None


def _exists(path):
    gfile = _gfile(path)
    return gfile.exists(path) if gfile is not None else os.path.exists(path)


def _isdir(path):
    gfile = _gfile(path)
    return gfile.isdir(path) if gfile is not None else os.path.isdir(path)


def _load(model, path, kind, index, targets):
    """Loads one checkpoint into `model`; raises a `ValueError` naming it if it does not fit.

    Every averaged variable is first filled with NaN, so that one the checkpoint holds no value
    for is seen after the load (a `tf.train.Checkpoint` restores what matches and ignores the
    rest; the model's optimizer, which it may also hold, is not the model's business here).
    """
    for variable in targets:
        _fill_nan(variable)
    try:
        if kind == "keras":
            model.load_weights(path)
            missing = _unrestored(targets)
        else:
            # `tf.train.Checkpoint(model=model)` layout first, then the model as the root.
            for layout in ({"model": model}, {"root": model}):
                tf.train.Checkpoint(**layout).read(path).expect_partial()
                missing = _unrestored(targets)
                if not missing:
                    break
                for variable in targets:
                    _fill_nan(variable)
    except Exception as e:  # noqa: BLE001  (any failure to read is reported with the path)
        raise ValueError(
            f"Checkpoint paths[{index}]={path!r} does not match the model "
            f"{getattr(model, 'name', model)!r} or cannot be read; the model's weights are "
            f"restored. Original error: {type(e).__name__}: {e}"
        ) from e
    if missing:
        names = [getattr(v, "path", None) or v.name for v in missing]
        raise ValueError(
            f"Checkpoint paths[{index}]={path!r} does not match the model "
            f"{getattr(model, 'name', model)!r}: it holds no value for {len(missing)} of its "
            f"{len(targets)} averaged variables, first {names[0]!r}; the model's weights are "
            "restored."
        )


def _unrestored(targets):
    return [v for v in targets if int(np.prod(v.shape)) != 0 and _all_nan(v)]


def _all_nan(variable):
    if backend.IS_KERAS_3:
        return bool(keras.ops.all(keras.ops.isnan(variable)))
    return bool(tf.reduce_all(tf.math.is_nan(variable)))


def _fill_nan(variable):
    if backend.IS_KERAS_3:
        variable.assign(keras.ops.full(variable.shape, math.nan, dtype=variable.dtype))
    else:
        variable.assign(tf.fill(variable.shape, tf.constant(math.nan, variable.dtype)))


def _copy(variable):
    """The variable's value, kept apart from it until restored."""
    if backend.backend_name() == "jax":
        # An immutable `jax.Array`, no longer held by the variable once it is reassigned.
        return variable.value
    return tf.identity(tf.convert_to_tensor(variable))

