"""A model's variables seen from keras_swa's state: held untracked, copied, written, restored.

`SWAG`, `FGE` and `AveragedWeights` hold the model (or its variables) beside their own state
without making it part of their checkpoint (`Untracked`), write other values into its variables
(`assign_values`) and put the originals back exactly afterwards (`copy_values`, `restored`).

On JAX two rules apply (see `keras_swa.backends.jax`): during `fit` the trainer keeps the state
outside the variables, so it is synced into them first (`sync`); and an array read from a
variable can be donated (deleted) by a later compiled step, so what is kept is a copy, and what
is written is a fresh copy too.
"""

import contextlib

import numpy as np

from keras_swa import backend
from keras_swa.backend import keras
from keras_swa.lazy_tensorflow import tf

__all__ = [
    "Untracked",
    "assign_values",
    "collect",
    "copy_values",
    "matching",
    "placed_like",
    "restored",
    "sync",
    "variable_name",
]


class Untracked:
    """Holds objects as plain attributes: a `tf.Module` does not track them (nor checkpoint them).

    Example:

    >>> import tensorflow as tf
    >>> class Holder(tf.Module):
    ...     def __init__(self, variable):
    ...         super().__init__()
    ...         self._source = Untracked(variables=(variable,))
    >>> Holder(tf.Variable(1.0)).trainable_variables   # nothing tracked
    ()
    """

    def __init__(self, **values):
        self.__dict__.update(values)


def sync(model):
    """On JAX, writes a running `fit`'s state into `model`'s variables; elsewhere does nothing."""
    if model is not None and backend.backend_name() == "jax":
        from keras_swa.backends import jax as jax_backend

        jax_backend.sync(model)


def copy_values(variables):
    """Copies of the current values of `variables`, each in its own dtype."""
    if backend.backend_name() == "jax":
        from keras_swa.backends import jax as jax_backend

        return [jax_backend.copy_as(v.value, v.dtype) for v in variables]
    return [tf.identity(tf.convert_to_tensor(v)) for v in variables]


def placed_like(value, variable):
    """`value` (NumPy) as a new array placed as `variable`'s value (its sharding on JAX)."""
    if backend.backend_name() == "jax":
        import jax

        return jax.device_put(np.asarray(value), variable.value.sharding)
    return tf.convert_to_tensor(value)


def assign_values(variables, values):
    """Writes each value, cast to its variable's dtype, into its variable (a copy on JAX)."""
    if backend.backend_name() == "jax":
        from keras_swa.backends import jax as jax_backend

        for variable, value in zip(variables, values):
            variable.assign(jax_backend.copy_as(value, variable.dtype))
        return
    for variable, value in zip(variables, values):
        variable.assign(tf.cast(value, tf.as_dtype(variable.dtype)))


@contextlib.contextmanager
def restored(model):
    """Context manager: every variable of `model` (weights and statistics) is restored on exit.

    The values are copied on entry and written back exactly on exit, also when the body raises.

    Example:

    >>> from keras_swa.backend import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> with restored(model):
    ...     _ = model.layers[0].bias.assign([5.0])
    >>> float(model.layers[0].bias.numpy()[0])
    0.0
    """
    sync(model)
    variables = list(model.variables)
    backup = copy_values(variables)
    try:
        yield
    finally:
        assign_values(variables, backup)


def variable_name(variable):
    """A variable's name for messages: its Keras `path` if it has one, else its `name`."""
    return getattr(variable, "path", None) or getattr(variable, "name", repr(variable))


def collect(model_or_variables, include_non_trainable):
    """The floating-point variables of a built model/layer, or a checked list of variables.

    Args:
        model_or_variables: a built Keras model or layer, or a list of variables.
        include_non_trainable: take all of a model's variables, not only the trainable ones.

    Returns:
        A non-empty list of floating-point variables.
    """
    obj = model_or_variables
    if isinstance(obj, keras.layers.Layer):
        if not obj.built or not obj.variables:
            raise ValueError(
                "The model must be built (called on data, or created with an `Input`) "
                "before its weights can be averaged. "
                f"Received: model={obj.name!r} with built={obj.built}"
            )
        variables = obj.variables if include_non_trainable else obj.trainable_variables
    elif isinstance(obj, (list, tuple)):
        variables = list(obj)
        for v in variables:
            if not hasattr(v, "assign") or not hasattr(v, "shape"):
                raise TypeError(
                    "`model_or_variables` must be a Keras model/layer or a list of "
                    f"variables. Received an element of type {type(v).__name__}: {v!r}"
                )
    else:
        raise TypeError(
            "`model_or_variables` must be a built Keras model/layer or a list of "
            f"variables. Received: model_or_variables={obj!r}"
        )
    variables = list(variables)
    if not variables:
        raise ValueError(
            f"There are no variables to average. Received: model_or_variables={obj!r}"
        )
    for v in variables:
        if hasattr(v, "dtype") and not backend.is_floating(v):
            raise TypeError(
                "Only floating-point variables can be averaged. Received variable "
                f"{getattr(v, 'path', getattr(v, 'name', v))!r} of dtype {v.dtype}"
            )
    return variables


def matching(model, sources, include_non_trainable, what):
    """`model`'s variables that correspond to `sources`, checked for number and shapes.

    Args:
        model: the model to write into.
        sources: the variables the state (`what`, e.g. `"averages"`) was made from.
        include_non_trainable: as for `collect`.
        what: what the state is called in the error messages.
    """
    target = collect(model, include_non_trainable)
    shapes = [tuple(int(d) for d in v.shape) for v in sources]
    if len(target) != len(shapes):
        raise ValueError(
            f"The model's variables do not match the {what}: "
            f"expected {len(shapes)} variables, the model has {len(target)}. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    for i, (t, shape) in enumerate(zip(target, shapes)):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"Variable {i} ({getattr(t, 'path', getattr(t, 'name', ''))!r}) has shape "
                f"{tuple(t.shape)} but its average has shape {shape}. "
                f"Received: model={getattr(model, 'name', model)!r}"
            )
    return target
