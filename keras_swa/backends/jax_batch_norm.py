"""`update_bn`'s pass on the JAX backend: each batch through one `jax.jit`-compiled program.

The semantics are `keras_swa.batch_norm`'s (torch's `update_bn`): every BN layer that training
would update gets, as its moving mean (variance), the batch-size-weighted cumulative average of
the batch means (biased variances) the layer itself computes in training mode -- one pass, no
gradients, no optimizer step -- and everything touched is restored.

How, with public Keras 3 APIs only:

- The forward pass runs inside `keras.StatelessScope` (what `Layer.stateless_call` uses): every
  model variable is read from the values passed into the compiled program, and the layers'
  assignments are collected in the scope instead of written to the variables. So nothing the
  pass does reaches the model: no other variable (seed generators, BN layers left alone) needs
  restoring, and a failing pass leaves the model as it was.
- The BN statistics are fed in as zeros and each updated layer's `momentum` is 0 while the
  program is traced, so the value the layer assigns, `0 * 0 + batch_stat * (1 - 0)`, is exactly
  its batch statistic. The shared `keras_swa.batch_norm.accumulate` folds it into float32
  Neumaier sums inside the same program; `momentum` is restored when the pass ends.
- The program is traced once per input signature (once more for an uneven last batch) and kept
  per model (weakly), like the TensorFlow pass. Its sums are donated to it (`donate_argnums`);
  the model's own arrays are only read, never donated, and are re-read at every call after
  `keras_swa.backends.jax.sync` (during `fit` the trainer keeps the state outside the variables).
- A statistic the pass never assigns (a BN layer the forward pass does not call) is known when
  the program is traced; it keeps its value bit for bit.
- Under a `keras.distribution.DataParallel` (`check_distribution`) each batch is sharded over
  the mesh as `fit` shards it (`Distribution.get_data_layout`, `keras.distribution.
  distribute_tensor`); the variables are replicated. The batch mean and variance the BN layer
  computes inside the compiled program are then reductions over the whole batch (XLA inserts
  the cross-device sums), so the statistics are those of the single-device pass, up to the
  order of summation. A batch whose size the mesh does not divide (an uneven last batch) is
  replicated instead: every device computes the same statistics of all of it. The sums live
  replicated on the same devices, so every call has the same input shardings.
"""

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from keras_swa import batch_norm, distribution
from keras_swa.backend import keras
from keras_swa.backends.jax import replicated_like, sync

__all__ = ["check_distribution", "host_arrays", "recompute"]

# model -> {(variable ids, statistics ids, custom call?): batch_norm.CachedPass}; the passes hold the model
# (and a `call_fn`) weakly, so an entry dies with its model.
_PASSES = weakref.WeakKeyDictionary()


def check_distribution():
    """The `keras.distribution` in effect: `None` or a `DataParallel`, else a clear error."""
    return distribution.check_keras_distribution("keras_swa.update_bn")


def host_arrays(data):
    """`data` with every `jax.Array` leaf as a NumPy array (`update_bn` slices arrays itself)."""
    if isinstance(data, jax.Array):
        return np.asarray(data)
    if isinstance(data, (list, tuple, dict)):
        leaves = keras.tree.flatten(data)
        if any(isinstance(leaf, jax.Array) for leaf in leaves):
            return keras.tree.map_structure(
                lambda leaf: np.asarray(leaf) if isinstance(leaf, jax.Array) else leaf, data
            )
    return data


def _as_numpy(x):
    return keras.tree.map_structure(np.asarray, x)


def _shard(x, current):
    """`x` sharded over `current`'s batch axis as `fit` shards it, if the mesh divides it.

    A batch the mesh does not divide evenly is left to the compiled program, which replicates
    it like the variables: the statistics stay those of the whole batch.
    """
    if current is None:
        return x
    mesh = current.device_mesh
    shards = int(mesh.shape[list(mesh.axis_names).index(current.batch_dim_name)])

    def shard(leaf):
        if leaf.ndim == 0 or leaf.shape[0] % shards:
            return leaf
        return keras.distribution.distribute_tensor(leaf, current.get_data_layout(leaf.shape))

    return keras.tree.map_structure(shard, x)


def recompute(model, layers, batches, data, steps, progbar, call_fn):
    """The pass and the new statistics; returns the number of samples (see `update_bn`)."""
    current = check_distribution()
    sync(model)
    stats = [var for layer in layers for var in batch_norm.layer_statistics(layer)]
    compiled = _compiled_pass(model, stats, call_fn)
    inputs = [var.value for var in compiled.inputs]  # read now: never kept across calls
    size = sum(int(np.prod(var.shape)) for var in stats)
    # The sums live where the model does (replicated over a distribution's mesh).
    placement = replicated_like(stats[0].value)
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        sums = jax.device_put(np.zeros([size], np.float32), placement)
        compensations = jax.device_put(np.zeros([size], np.float32), placement)
        assigned = None
        seen = 0
        num_steps = 0
        for x in batches:
            n = batch_norm.batch_size_of(x, data)
            if n == 0:
                continue
            try:
                sums, compensations, assigned = compiled.step(
                    inputs, _shard(_as_numpy(x), current), jnp.float32(n), sums, compensations
                )
            except (ValueError, TypeError, KeyError) as e:
                raise batch_norm.pass_error(call_fn, num_steps + 1, x, data, e) from e
            seen += n
            num_steps += 1
            if progbar is not None:
                progbar.update(num_steps)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if seen == 0:
        raise batch_norm.no_data_error(data, steps)
    totals = np.asarray(sums + compensations)
    assigned = np.asarray(assigned)
    offset = 0
    for var, was_assigned in zip(stats, assigned):
        count = int(np.prod(var.shape))
        if was_assigned:
            average = totals[offset : offset + count].reshape(tuple(var.shape)) / np.float32(seen)
            # Placed as the statistic was, with or without the distribution in effect now.
            var.assign(jax.device_put(jnp.asarray(average, var.dtype), var.value.sharding))
        offset += count
    return seen


class _Pass:
    """The compiled pass of one model: `step(inputs, x, count, sums, compensations)`.

    `inputs` are the values of `self.inputs`, every model variable but the statistics (which
    enter as zeros). Returns the new sums and compensations, and one bool per statistic: did the
    forward pass assign it (known at trace time)?
    """

    def __init__(self, model, statistics, call_fn):
        self._model = weakref.ref(model)
        ref = batch_norm.weak_call_fn(call_fn)
        self._custom = call_fn is not None
        # No weak reference possible: held strongly, and this pass is never cached.
        self._call_fn = (lambda: call_fn) if ref is None else ref
        self.statistics = list(statistics)
        stat_ids = {id(var) for var in self.statistics}
        self.inputs = [var for var in model.variables if id(var) not in stat_ids]
        self.traces = 0
        self.step = jax.jit(self._step, donate_argnums=(3, 4))

    def _step(self, inputs, x, count, sums, compensations):
        self.traces += 1  # a Python side effect: runs only while tracing
        mapping = list(zip(self.inputs, inputs)) + [
            (var, jnp.zeros(tuple(var.shape), var.dtype)) for var in self.statistics
        ]
        model = self._model()
        with keras.StatelessScope(state_mapping=mapping) as scope:
            if not self._custom:
                model(x, training=True)
            else:
                call_fn = self._call_fn()
                if call_fn is None:  # never reused once it is gone (`CachedPass.serves`)
                    raise RuntimeError("The `call_fn` of this `update_bn` pass no longer exists.")
                call_fn(model, x)
        values = [scope.get_current_value(var) for var in self.statistics]
        assigned = [value is not None for value in values]
        values = [
            jnp.zeros(tuple(var.shape), jnp.float32) if value is None else value
            for var, value in zip(self.statistics, values)
        ]
        sums, compensations = batch_norm.accumulate(sums, compensations, values, count)
        return sums, compensations, jnp.asarray(assigned, dtype=bool)


def _compiled_pass(model, statistics, call_fn):
    """The model's `_Pass` for these statistics and `call_fn`, created on first use."""
    key = (
        tuple(id(var) for var in model.variables),
        tuple(id(var) for var in statistics),
        call_fn is not None,
    )
    try:
        passes = _PASSES.setdefault(model, {})
    except TypeError:  # an object that cannot be weakly referenced: no reuse
        passes = {}
    cached = passes.get(key)
    if cached is not None and cached.serves(None, call_fn):
        return cached.step
    compiled = _Pass(model, statistics, call_fn)
    call_fn_ref = batch_norm.weak_call_fn(call_fn)
    if call_fn is None or call_fn_ref is not None:
        passes[key] = batch_norm.CachedPass(None, call_fn_ref, compiled)
    else:
        passes.pop(key, None)
    return compiled
