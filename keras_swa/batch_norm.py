"""Recomputes BatchNormalization statistics for averaged weights (SWA's BN update).

Stochastic Weight Averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018, arXiv 1803.05407) averages the weights SGD visits. The moving mean and
variance a `BatchNormalization` layer collected during training belong to the individual SGD
iterates, not to their average, so after the averaged weights are put into the model the
statistics are recomputed with one forward pass over the training data in training mode
(section 3.2 of the paper; torch's `torch.optim.swa_utils.update_bn`).

`update_bn` follows torch's semantics: for every BN layer that training would update, the new
moving mean (variance) is the cumulative average over the pass -- weighted by batch size -- of
each batch's mean (biased variance), exactly as the layer computes them itself; not an
exponential average. No gradients are computed and no optimizer step is taken.

How it stays on public APIs: the layers themselves run the pass. During the pass each such
layer's `momentum` is 0, so after every batch its moving statistics hold that batch's statistics
(`moving = momentum * moving + (1 - momentum) * batch_stat`); a `tf.function` folds them into
float32 running sums with Neumaier (compensated) summation right after the forward pass -- no
float64, which TPUs lack, and no host round trip inside a batch -- and the averages are written
back once the whole pass has succeeded.

Under a `tf.distribute` strategy (the one in scope, else the one the model was built under) each
global batch is split between the replicas and every replica runs the pass on its share
(`strategy.run`). With ordinary BN each replica's statistics of its share are folded into one
global cumulative average weighted by the share's size; with `BatchNormalization(synchronized=True)`
the layer's statistics are those of the whole global batch. The sums are added across replicas
(and workers) once, at the end, so every replica ends with the same statistics.

The compiled pass is kept per model (weakly: it never keeps a model alive) and reused by later
calls with the same layers, strategy, `jit_compile` and `call_fn`, so calling `update_bn` every
epoch or for every SWAG draw traces the model once, as `fit` does. Like Keras' own compiled train
and predict functions, it reflects the model's Python-level configuration at its first call.
A `call_fn` is held weakly too, and a different `call_fn` (another function object) gets a new
pass: a cached pass never runs a forward pass the caller did not ask for.

This module is what every backend shares: the arguments, the layers to update, the data and
its batches, the Neumaier sums (`accumulate`) and the pass cache's entries. The pass itself is
the backend's: `keras_swa.backends.tensorflow_batch_norm` (a `tf.function` per replica under
`tf.distribute`; also tf_keras) or `keras_swa.backends.jax_batch_norm` (one `jax.jit`).
"""

import math
import sys
import weakref

import numpy as np

from keras_swa import backend
from keras_swa.arguments import is_int
from keras_swa.backend import keras, nest
from keras_swa.lazy_tensorflow import is_instance, tf

__all__ = [
    "CachedPass",
    "accumulate",
    "batch_size_of",
    "layer_statistics",
    "no_data_error",
    "pass_error",
    "update_bn",
    "weak_call_fn",
]

_DEFAULT_BATCH_SIZE = 32


def update_bn(
    model, data, steps=None, batch_size=None, verbose="auto", jit_compile=False, call_fn=None
):
    """Recomputes the moving statistics of a model's BatchNormalization layers.

    Runs one forward pass over `data` in training mode (no gradients, no optimizer step) and sets
    the `moving_mean` / `moving_variance` of every `BatchNormalization` layer that training would
    update -- nested models and layers included -- to the cumulative average, weighted by batch
    size, of the per-batch means and variances the layer itself folds into its moving statistics:
    the biased variance over the layer's reduction axes (tf_keras' fused kernel, its default for
    4D and 5D inputs, uses the Bessel-corrected batch variance, and so does `update_bn` there).
    This is torch's `update_bn`; call it after putting averaged (SWA) weights into the model.

    A layer is updated when it and every layer or model that encloses it are `trainable`; frozen
    layers, BN layers inside frozen parents and BN layers the forward pass never calls keep their
    statistics bit for bit (non-finite statistics of updated layers are reset to zero first).
    Everything the function touches -- each layer's `momentum`, every other variable of the
    model -- is restored afterwards, also when the pass fails; the new statistics are only written
    if the whole pass succeeded. A BN layer called several times in one forward pass (a shared
    layer) gets the statistics of its last call in each batch.

    Under a `tf.distribute` strategy (the one in scope, else `model.distribute_strategy`) every
    worker passes the same `data`: each global batch is split into `num_replicas_in_sync`
    consecutive shares, the larger ones first (as `numpy.array_split` and `tf.data` rebatching
    split it), and replica `i` runs the pass on share `i`. With ordinary BN the result is the
    cumulative average, weighted by share size, of every replica's statistics of its share; with
    `BatchNormalization(synchronized=True)` it is the cumulative average of the global batches'
    statistics. Every replica (and worker) ends with the same statistics.
    `ParameterServerStrategy` is not supported.

    On Keras 3's JAX backend the pass is compiled with `jax.jit` (`jit_compile` has no effect
    there) and runs the forward pass in a `keras.StatelessScope`, so it writes nothing but the
    new statistics (`keras_swa.backends.jax_batch_norm`); data may also be `jax.Array`s. Under
    a `keras.distribution.DataParallel` each batch is sharded over the devices and the
    statistics are still those of the whole batch; other distributions are refused
    (`NotImplementedError`). Keras itself allows `synchronized=True` on TensorFlow only.

    Args:
        model: a built Keras model.
        data: the inputs for the pass, usually the training inputs without augmentation: a
            `tf.data.Dataset` of batches (elements `x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)`), a `keras.utils.PyDataset` (`keras.utils.Sequence` in
            tf_keras), a NumPy array or tensor, a list or dict of them (multi-input models), a
            tuple `(x, y)` or `(x, y, sample_weight)` of them, or any iterable of batches. Only
            `x` is used.
        steps: maximal number of batches to use. Defaults to `None` (all of `data`; required
            for infinite data).
        batch_size: batch size for array/tensor `data`; not allowed with datasets, which are
            already batched. Defaults to `None` (32).
        verbose: `"auto"`, 0, 1 or 2. 1 shows a `keras.utils.Progbar` for the pass, 2 one line
            at its end, 0 nothing. `"auto"` is 1 when the number of batches is known and above 1
            and the output is interactive, else 0. Defaults to `"auto"`.
        jit_compile: compile each replica's forward pass with XLA (`tf.function(...,
            jit_compile=True)` per replica; the pass holds no float64 and no host round trip).
            Not needed under TPUStrategy, which compiles the pass itself; not possible with
            synchronized BN on several replicas. On JAX the pass is always compiled.
            Defaults to `False`.
        call_fn: a callable `call_fn(model, x)`, for models whose forward pass needs more
            than `model(x, training=True)`. It runs the forward pass for one batch's inputs `x`
            (the `x` of each data element, as above; under a strategy, the replica's share of
            it) in place of `model(x, training=True)`, inside the compiled pass: it is traced
            like a `train_step` (TensorFlow/Keras ops only; with `jit_compile=True` it must
            compile with XLA). It must call the model or its layers with `training=True`: BN
            layers it calls in inference mode, or not at all, keep their statistics. Its return
            value is ignored. Each batch is weighted by the first dimension of `x`, so it may
            select or transform inputs but must not drop samples. Everything else holds as
            without it: reset, exact cumulative averages, one pass, everything restored.
            Defaults to `None` (`model(x, training=True)`).

    Returns:
        The number of samples in the pass (an int); 0 when the model has no BN layer to update,
        in which case `data` is not read.

    Raises:
        ValueError: if the model is not built, if `data` is empty, is not a supported type or
            does not fit the model's inputs, or if an argument is invalid.
        RuntimeError: if called inside `strategy.run` (in a replica context).

    Example:

    >>> import numpy as np
    >>> from keras_swa.backend import keras
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.BatchNormalization(momentum=0.9)])
    >>> x = np.arange(12, dtype="float32").reshape(4, 3)
    >>> update_bn(model, x, batch_size=2, verbose=0)
    4
    >>> bn = model.layers[-1]
    >>> np.asarray(bn.moving_mean).tolist()  # mean of x
    [4.5, 5.5, 6.5]
    >>> np.asarray(bn.moving_variance).tolist()  # mean of the two batch variances
    [2.25, 2.25, 2.25]

    A custom forward pass, here feeding the model half of its inputs:

    >>> update_bn(model, x, batch_size=2, verbose=0,
    ...           call_fn=lambda model, x: model(x * 0.5, training=True))
    4
    >>> np.asarray(bn.moving_mean).tolist()  # mean of x / 2
    [2.25, 2.75, 3.25]
    """
    backend.require_backend("update_bn")
    _check_arguments(steps, batch_size, verbose)
    if not isinstance(jit_compile, bool):
        raise ValueError(f"`jit_compile` must be True or False. Received: jit_compile={jit_compile!r}")
    if call_fn is not None and not callable(call_fn):
        raise ValueError(
            "`call_fn` must be a callable `call_fn(model, x)` that runs the forward pass in "
            f"training mode, or None. Received: call_fn={call_fn!r}"
        )
    if not getattr(model, "built", False):
        raise ValueError(
            "`update_bn` needs a built model (its BatchNormalization layers create their "
            "statistics when the model is built): call the model on data, give it a "
            "`keras.Input`, or call `model.build(input_shape)` first. "
            f"Received: model={model!r} (built=False)"
        )
    if backend.backend_name() == "jax":
        # The same reset, pass and cumulative averages, compiled with `jax.jit`.
        from keras_swa.backends import jax_batch_norm

        jax_batch_norm.check_distribution()
        layers = _layers_to_update(model)
        if not layers:
            return 0
        batches, num_batches = _batches(jax_batch_norm.host_arrays(data), batch_size, steps)
        progbar = _progbar(num_batches, verbose)
        return jax_batch_norm.recompute(model, layers, batches, data, steps, progbar, call_fn)

    # The TensorFlow pass (tf_keras included): per replica under a `tf.distribute` strategy.
    from keras_swa.backends import tensorflow_batch_norm

    strategy = tensorflow_batch_norm.strategy_for(model)
    layers = _layers_to_update(model)
    if not layers:
        return 0
    tensorflow_batch_norm.check_jit_compile(layers, strategy, jit_compile)
    batches, num_batches = _batches(data, batch_size, steps)
    progbar = _progbar(num_batches, verbose)
    return tensorflow_batch_norm.recompute(
        model, layers, batches, data, steps, progbar, strategy, jit_compile, call_fn
    )


def _progbar(num_batches, verbose):
    """A `keras.utils.Progbar` for the pass, or None (`verbose` as `update_bn` takes it)."""
    if verbose == "auto":
        verbose = 1 if num_batches is not None and num_batches > 1 and _interactive() else 0
    return keras.utils.Progbar(num_batches, verbose=verbose) if verbose else None


def pass_error(call_fn, batch, x, data, error):
    """The `ValueError` for a batch the forward pass could not run on (both backends)."""
    runner = "the model" if call_fn is None else f"`call_fn` ({call_fn!r})"
    return ValueError(
        f"`update_bn` could not run {runner} on a batch of `data` (batch "
        f"{batch}, inputs {_describe(x)}); the data must match the model's "
        "inputs and come in batches (a tf.data.Dataset must be batched). "
        f"Received: data={_describe(data)}. Original error: {error}"
    )


def no_data_error(data, steps):
    """The `ValueError` for `data` that yielded no samples (both backends)."""
    return ValueError(
        "`update_bn` received no data: `data` yielded no samples, so the BatchNorm "
        f"statistics cannot be recomputed. Received: data={_describe(data)}"
        + (f", steps={steps}" if steps is not None else "")
    )


class CachedPass:
    """A model's compiled pass, with what it was built for (`strategy`, `call_fn`)."""

    def __init__(self, strategy, call_fn_ref, step):
        self.strategy = strategy
        self.call_fn_ref = call_fn_ref
        self.step = step

    def serves(self, strategy, call_fn):
        if self.strategy is not strategy:
            return False
        if call_fn is None:
            return self.call_fn_ref is None
        cached = None if self.call_fn_ref is None else self.call_fn_ref()
        # `==`: a bound method is a new object at every attribute access, equal to the last.
        return cached is not None and (cached is call_fn or cached == call_fn)


def weak_call_fn(call_fn):
    """A weak reference to `call_fn` (`WeakMethod` for bound methods); `None` if impossible.

    Held weakly so that the cache (whose keys are the models) never keeps alive a `call_fn`
    that closes over its model.
    """
    if call_fn is None:
        return None
    try:
        if hasattr(call_fn, "__self__") and hasattr(call_fn, "__func__"):
            return weakref.WeakMethod(call_fn)
        return weakref.ref(call_fn)
    except TypeError:
        return None


def accumulate(sums, compensations, statistics, count):
    """Adds `count` times the statistics to float32 running sums (Neumaier summation).

    The compensated sum keeps the error of the total at float32 rounding however many batches
    are added, without float64 (which TPUs do not have). `sum + compensation` is the total.

    Args:
        sums: float32 vector, the running sums of all statistics, flattened and concatenated.
        compensations: float32 vector of the same size, the running rounding corrections.
        statistics: the statistics of this batch (tensors of any float dtype and shape), in
            the order of `sums`.
        count: float32 scalar, the number of samples they were computed from. A share with no
            samples (0) adds nothing; its statistics (NaN) are ignored.

    Returns:
        The new `(sums, compensations)`.
    """
    ops = backend.ops  # shared by the TensorFlow pass and the JAX one (keras_swa.backends)
    flat = ops.concatenate(
        [ops.reshape(ops.cast(v, "float32"), [-1]) for v in statistics], axis=0
    )
    term = ops.where(count > 0, flat * count, ops.zeros_like(flat))
    total = sums + term
    lost = ops.where(ops.abs(sums) >= ops.abs(term), (sums - total) + term, (term - total) + sums)
    return total, compensations + lost


def _check_arguments(steps, batch_size, verbose):
    if steps is not None and not (is_int(steps) and steps > 0):
        raise ValueError(f"`steps` must be a positive integer or None. Received: steps={steps!r}")
    if batch_size is not None and not (is_int(batch_size) and batch_size > 0):
        raise ValueError(
            f"`batch_size` must be a positive integer or None. Received: batch_size={batch_size!r}"
        )
    if not (verbose == "auto" or (is_int(verbose) and verbose in (0, 1, 2))):
        raise ValueError(f'`verbose` must be "auto", 0, 1 or 2. Received: verbose={verbose!r}')


def _layers_to_update(model):
    """The built BN layers that training would update: trainable, inside trainable parents."""
    frozen = set()
    for layer in backend.iter_layers(model):  # parents come before their children
        if id(layer) not in frozen and not layer.trainable:
            frozen.update(id(sub) for sub in backend.iter_layers(layer))
    return [
        layer
        for layer in backend.batch_norm_layers(model)
        if id(layer) not in frozen and layer.built and layer.moving_mean is not None
    ]


def layer_statistics(layer):
    """The variables a BN layer's `momentum` governs (renorm layers also keep a moving stddev)."""
    variables = [layer.moving_mean, layer.moving_variance]
    if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
        variables.append(layer.moving_stddev)
    return variables


def _sequence_types():
    names = ("PyDataset", "Sequence")
    return tuple(getattr(keras.utils, name) for name in names if hasattr(keras.utils, name))


def _batches(data, batch_size, steps):
    """Returns `(iterable of input batches x, number of batches or None)`."""
    if is_instance(data, "data.Dataset"):
        _no_batch_size(data, batch_size)
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
            raise ValueError(
                "`data` is an infinite dataset: pass `steps`, the number of batches to use. "
                f"Received: data={_describe(data)}, steps=None"
            )
        if steps is not None:
            data = data.take(steps)
        num = int(data.cardinality())
        return (_unpack_x(element) for element in data), (num if num >= 0 else None)

    if isinstance(data, _sequence_types()):
        _no_batch_size(data, batch_size)
        num = data.num_batches if hasattr(data, "num_batches") else len(data)
        if num is None and steps is None:
            raise ValueError(
                "`data` is an infinite PyDataset: pass `steps`, the number of batches to use. "
                f"Received: data={_describe(data)}, steps=None"
            )
        num = steps if num is None else (num if steps is None else min(num, steps))
        return (_unpack_x(data[i]) for i in range(num)), num

    x = _unpack_x(data) if isinstance(data, tuple) else data
    leaves = nest.flatten(x)
    if leaves and all(
        isinstance(leaf, np.ndarray) or is_instance(leaf, "Tensor") for leaf in leaves
    ):
        return _array_batches(x, data, batch_size or _DEFAULT_BATCH_SIZE, steps)

    _no_batch_size(data, batch_size)
    if isinstance(data, (str, bytes, dict, list, tuple)) or not hasattr(data, "__iter__"):
        raise ValueError(
            "`update_bn` accepts a tf.data.Dataset, a keras.utils.PyDataset, NumPy arrays or "
            "tensors (also in a list, dict or (x, y) tuple) or an iterable of batches. "
            f"Received: data={_describe(data)}"
        )
    iterator = (_unpack_x(element) for element in data)
    if steps is not None:
        iterator = (x for _, x in zip(range(steps), iterator))
    return iterator, steps


def _array_batches(x, data, batch_size, steps):
    leaves = nest.flatten(x)
    sizes = {int(leaf.shape[0]) if len(leaf.shape) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "All input arrays must have the same number of samples (first dimension). "
            f"Received: data={_describe(data)}"
        )
    (size,) = sizes
    if size == 0:
        raise ValueError(
            "`update_bn` received no data: the input arrays hold 0 samples. "
            f"Received: data={_describe(data)}"
        )
    num = math.ceil(size / batch_size)
    if steps is not None:
        num = min(num, steps)

    def generate():
        for i in range(num):
            start, stop = i * batch_size, min((i + 1) * batch_size, size)
            yield nest.map_structure(lambda a: _as_batch(a[start:stop]), x)

    return generate(), num


def _as_batch(array):
    """A slice of array `data` as the pass takes it: a tensor on TensorFlow, as is elsewhere."""
    if backend.backend_name() == "tensorflow":
        return tf.convert_to_tensor(array)
    return array


def _no_batch_size(data, batch_size):
    if batch_size is not None:
        raise ValueError(
            "`batch_size` is only for array or tensor `data`; datasets are already batched. "
            f"Received: batch_size={batch_size!r}, data={_describe(data)}"
        )


def _unpack_x(element):
    """`x` from `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`, as Keras' `fit` reads data."""
    if isinstance(element, tuple):
        if not 1 <= len(element) <= 3:
            raise ValueError(
                "Data elements must be `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`. "
                f"Received: a tuple of {len(element)} items: {_describe(element)}"
            )
        return element[0]
    return element


def batch_size_of(x, data):
    """The number of samples in batch `x` (its inputs' leading dimension), checked."""
    leaves = nest.flatten(x)
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    raise ValueError(
        "Each batch of `data` must hold at least one tensor with a batch dimension. "
        f"Received: a batch {_describe(x)} from data={_describe(data)}"
    )


def _describe(data):
    """A short description of `data` for error messages (shapes, not values)."""
    if is_instance(data, "data.Dataset"):
        return f"<{type(data).__name__} element_spec={data.element_spec}>"
    if isinstance(data, _sequence_types()):
        return f"<{type(data).__name__}>"

    def leaf(value):
        if isinstance(value, np.ndarray) or is_instance(value, "Tensor"):
            return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype.name})"
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    try:
        return str(nest.map_structure(leaf, data))
    except (TypeError, ValueError):
        return leaf(data)


def _interactive():
    return bool(getattr(sys.stdout, "isatty", lambda: False)()) or "ipykernel" in sys.modules
