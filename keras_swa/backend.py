"""The one place where Keras 3 and tf_keras (Keras 2) differ, and which Keras backend runs.

keras_swa follows TensorFlow's own switch: with `TF_USE_LEGACY_KERAS=1` in the environment,
`tf.keras` is tf_keras (Keras 2) and so is keras_swa's `keras`; otherwise both are Keras 3.
Every other module imports `keras` from here and calls the helpers below instead of branching
on the Keras version itself.

Keras 3 also runs on JAX and PyTorch (`KERAS_BACKEND`). `SUPPORTED_BACKENDS` says which
backends each public entry point runs on, and `require_backend` refuses the others with a clear
error when the entry point is constructed or called: an entry point that has not been ported to
a backend must never compute there (a half-working update would give wrong averages silently).
"""

import logging
import os
import sys

from keras_swa.lazy_tensorflow import tf

__all__ = [
    "IS_KERAS_3",
    "SUPPORTED_BACKENDS",
    "keras",
    "nest",
    "ops",
    "backend_name",
    "batch_norm_layers",
    "get_learning_rate",
    "index_dtype",
    "is_floating",
    "is_interactive_logging_enabled",
    "iter_layers",
    "print_msg",
    "require_argument_backend",
    "require_backend",
    "set_learning_rate",
    "steps_per_execution",
    "tf_variable",
    "StateModule",
]

if os.environ.get("TF_USE_LEGACY_KERAS", "0").strip().lower() in ("1", "true", "yes"):
    import tf_keras as keras  # noqa: F401  (re-exported)

    class ops:  # noqa: N801  (stands in for the `keras.ops` module)
        """The few `keras.ops` functions keras_swa's shared code uses, for tf_keras (no ops)."""

        abs = staticmethod(tf.abs)
        cast = staticmethod(tf.cast)
        clip = staticmethod(tf.clip_by_value)
        concatenate = staticmethod(lambda xs, axis=0: tf.concat(xs, axis=axis))
        convert_to_tensor = staticmethod(tf.convert_to_tensor)
        cos = staticmethod(tf.cos)
        equal = staticmethod(tf.equal)
        floor = staticmethod(tf.math.floor)
        maximum = staticmethod(tf.maximum)
        minimum = staticmethod(tf.minimum)
        mod = staticmethod(tf.math.floormod)
        power = staticmethod(tf.pow)
        reshape = staticmethod(tf.reshape)
        where = staticmethod(tf.where)
        zeros = staticmethod(tf.zeros)
        zeros_like = staticmethod(tf.zeros_like)

    IS_KERAS_3 = False
else:
    import keras  # noqa: F401  (re-exported)
    from keras import ops  # noqa: F401  (re-exported)

    IS_KERAS_3 = True

# The Keras backends each public entry point runs on (tf_keras always runs on TensorFlow).
SUPPORTED_BACKENDS = {
    "AveragedWeights": ("tensorflow", "jax"),
    "SWA": ("tensorflow", "jax"),
    "SWAG": ("tensorflow", "jax"),
    "FGE": ("tensorflow", "jax"),
    "SwapAveragedWeights": ("tensorflow", "jax"),
    "update_bn": ("tensorflow", "jax"),
    "average_checkpoints": ("tensorflow", "jax"),
    "export_saved_model": ("tensorflow", "jax"),
    "schedules": ("tensorflow", "jax"),
}

# Arguments of an entry point that need more than the entry point itself runs on: refused, by
# name, where they would not work (`require_argument_backend`), never silently ignored.
SUPPORTED_ARGUMENT_BACKENDS = {
    ("SWA", "backup_dir"): ("tensorflow", "jax"),
    ("SWA", "export_dir"): SUPPORTED_BACKENDS["export_saved_model"],
}


def backend_name():
    """The Keras backend in use: `keras.config.backend()`, `"tensorflow"` for tf_keras."""
    if not IS_KERAS_3:
        return "tensorflow"
    return keras.config.backend()


def index_dtype():
    """The integer dtype for step counts: int64, or int32 on JAX without `jax_enable_x64`."""
    if backend_name() == "jax":
        import jax

        return "int64" if jax.config.jax_enable_x64 else "int32"
    return "int64"


def is_floating(value):
    """Whether a tensor (of any backend) has a floating-point dtype."""
    dtype = value.dtype
    return "float" in str(getattr(dtype, "name", dtype))


def require_backend(entry_point, backend=None):
    """Raises `NotImplementedError` if `entry_point` does not run on the Keras backend in use.

    Args:
        entry_point: a key of `SUPPORTED_BACKENDS`, e.g. `"AveragedWeights"`.
        backend: the backend to check. Defaults to `None` (`backend_name()`).

    Example:

    >>> require_backend("AveragedWeights", backend="tensorflow")
    >>> require_backend("AveragedWeights", backend="torch")
    Traceback (most recent call last):
    ...
    NotImplementedError: keras_swa.AveragedWeights does not support the 'torch' Keras backend...
    """
    supported = SUPPORTED_BACKENDS[entry_point]
    backend = backend_name() if backend is None else backend
    if backend not in supported:
        names = ", ".join(repr(name) for name in supported)
        raise NotImplementedError(
            f"keras_swa.{entry_point} does not support the {backend!r} Keras backend; it "
            f"supports {names}. Select a supported backend with the KERAS_BACKEND environment "
            f"variable (e.g. KERAS_BACKEND=tensorflow) before Keras is imported. "
            f"Received: backend={backend!r}"
        )


def require_argument_backend(entry_point, argument, value, backend=None):
    """Raises `NotImplementedError` if `argument` of `entry_point` is given (not `None`) on a
    Keras backend it does not run on (`SUPPORTED_ARGUMENT_BACKENDS`).

    Example:

    >>> require_argument_backend("SWA", "backup_dir", None, backend="torch")  # not given
    >>> require_argument_backend("SWA", "backup_dir", "/tmp/swa", backend="torch")
    Traceback (most recent call last):
    ...
    NotImplementedError: keras_swa.SWA(backup_dir=...) does not support the 'torch' Keras backend...
    """
    if value is None:
        return
    supported = SUPPORTED_ARGUMENT_BACKENDS[(entry_point, argument)]
    backend = backend_name() if backend is None else backend
    if backend not in supported:
        names = ", ".join(repr(name) for name in supported)
        raise NotImplementedError(
            f"keras_swa.{entry_point}({argument}=...) does not support the {backend!r} Keras "
            f"backend yet; it supports {names}. Pass {argument}=None on {backend!r}, or select "
            "a supported backend with the KERAS_BACKEND environment variable before Keras is "
            f"imported. Received: {argument}={value!r}, backend={backend!r}"
        )


def is_interactive_logging_enabled():
    """Whether Keras prints to stdout (`True`) or logs through absl (`False`).

    Keras 3 calls it `keras.config.is_interactive_logging_enabled`, tf_keras
    `tf_keras.utils.is_interactive_logging_enabled`; both follow
    `disable_interactive_logging()` / `enable_interactive_logging()` of the same module.
    """
    if IS_KERAS_3:
        return keras.config.is_interactive_logging_enabled()
    return keras.utils.is_interactive_logging_enabled()


def print_msg(message):
    """Writes a callback message where Keras' own callbacks write theirs.

    With interactive logging enabled (the default) the message and a line break go to stdout,
    as Keras' `ModelCheckpoint` or `ReduceLROnPlateau` print: start the message with `"\n"` to
    end a progress bar's line first. With interactive logging disabled it goes to absl logging
    at INFO level, without leading line breaks (a log record is its own line).

    Args:
        message: the text, e.g. `"\nEpoch 5: SWA captured the weights (n_averaged=3)."`.
    """
    if is_interactive_logging_enabled():
        sys.stdout.write(f"{message}\n")
        sys.stdout.flush()
    else:
        # absl's logger, reached through the standard library: `absl.logging.info` logs to
        # this same logger, and keras_swa does not depend on absl-py itself.
        logging.getLogger("absl").info(message.lstrip("\n"))


def iter_layers(model):
    """Yields `model` and every layer nested in it, each once, parents first.

    Uses only public structure: `layer.layers` of models, and layers held in attributes (also
    inside lists, tuples and dicts), which is how both Keras versions track sublayers.
    """
    seen = set()
    stack = [model]
    while stack:
        obj = stack.pop()
        if isinstance(obj, keras.layers.Layer):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield obj
            children = list(getattr(obj, "layers", None) or [])
            for value in vars(obj).values():
                children.append(value)
            stack.extend(reversed(children))
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(list(obj)))
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))


def batch_norm_layers(model):
    """Returns every `BatchNormalization` layer inside `model` (nested ones included)."""
    return [
        layer
        for layer in iter_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def get_learning_rate(optimizer):
    """The learning rate of the last step taken, as a Python float (the first step's before any).

    For a schedule-driven optimizer this is `schedule(iterations - 1)`: the rate the weights
    just captured were trained with. Keras 3's `optimizer.learning_rate` evaluates the schedule
    at the next step instead, tf_keras' holds the last step's; both report the same here.
    """
    schedule = _learning_rate_schedule(optimizer)
    if schedule is not None:
        step = max(int(optimizer.iterations.numpy()) - 1, 0)
        return _to_float(schedule(step))
    return _to_float(optimizer.learning_rate)


def _to_float(value):
    """A scalar tensor or variable of the backend in use, as a Python float."""
    if backend_name() != "tensorflow":
        return float(keras.ops.convert_to_numpy(value))
    return float(tf.convert_to_tensor(value))


def _learning_rate_schedule(optimizer):
    """The optimizer's `LearningRateSchedule`, or None if it has a plain learning rate."""
    lr = optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):  # tf_keras (some)
        return lr
    if not IS_KERAS_3:
        # tf_keras optimizers hold the last step's scheduled rate in `learning_rate`.
        return None
    if isinstance(lr, keras.Variable):
        # A plain learning rate (wrappers such as LossScaleOptimizer return the inner one's):
        # no schedule to look up, so per-step reads skip the config below.
        return None
    # Keras 3 evaluates the schedule when `learning_rate` is read; its config holds the
    # schedule itself (a wrapper such as LossScaleOptimizer delegates to `inner_optimizer`).
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        return _learning_rate_schedule(inner)
    config = optimizer.get_config().get("learning_rate")
    if not isinstance(config, dict):
        return None
    try:
        return keras.optimizers.schedules.deserialize(config)
    except (TypeError, ValueError):  # an unregistered custom schedule: the next step's rate
        return None


def set_learning_rate(optimizer, value):
    """Sets a variable learning rate; raises a clear error if the optimizer has a schedule."""
    try:
        optimizer.learning_rate = float(value)
    except (TypeError, ValueError, AttributeError) as e:
        raise TypeError(
            "keras_swa cannot set the learning rate of this optimizer: it was built with a "
            "learning-rate schedule (or a callable), which owns the learning rate. Build the "
            "optimizer with a float learning rate, or pass `swa_lr=None` and put a "
            "`keras_swa.schedules` schedule in the optimizer yourself. "
            f"Received: optimizer={optimizer!r} (learning_rate={optimizer.learning_rate!r}). "
            f"Original error: {e}"
        ) from e


def steps_per_execution(model):
    """How many train steps `fit` runs between two batch callbacks (1 when not compiled)."""
    value = getattr(model, "steps_per_execution", None)
    if value is None:  # tf_keras keeps it in a variable
        value = getattr(model, "_steps_per_execution", None)
    if value is None:
        return 1
    if isinstance(value, int):
        return value
    return int(tf.convert_to_tensor(value))


def tf_variable(variable):
    """The `tf.Variable` behind a Keras variable (Keras 3 wraps one; tf_keras uses it directly)."""
    if IS_KERAS_3 and isinstance(variable, keras.Variable):
        return variable.value
    return variable


class _NamedState:
    """The base of keras_swa's stateful objects off TensorFlow: a name, nothing tracked.

    On JAX their state is `keras.Variable`s, which `tf.train.Checkpoint` cannot save. Were they
    `tf.Module`s there, a checkpoint would accept them and silently write and restore nothing;
    as plain objects, `tf.train.Checkpoint(swa=averaged)` refuses them at once ("expecting ...
    a trackable object"), as it refuses a Keras 3 model on JAX.
    """

    def __init__(self, name=None):
        self._name = name

    @property
    def name(self):
        """The name given at construction."""
        return self._name


# The base class of `AveragedWeights`, `SWAG` and `FGE`: a `tf.Module` (carried by
# `tf.train.Checkpoint`) where their state is `tf.Variable`s, i.e. on TensorFlow and tf_keras;
# a plain named object on the other Keras backends (see `_NamedState`). Fixed when keras_swa is
# imported, like the Keras backend itself.
StateModule = tf.Module if backend_name() == "tensorflow" else _NamedState

# Nested structures of tensors (`flatten`, `map_structure`, `pack_sequence_as`): `tf.nest` on
# TensorFlow, whose `tf.data` elements and signatures it was written for; `keras.tree` elsewhere,
# which flattens the same structures in the same order (dicts by sorted key) without TensorFlow.
nest = tf.nest if backend_name() == "tensorflow" else keras.tree
