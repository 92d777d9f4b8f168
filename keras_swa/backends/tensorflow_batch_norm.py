"""`update_bn`'s pass on TensorFlow (and tf_keras): each batch through a `tf.function`.

The semantics are `keras_swa.batch_norm`'s (torch's `update_bn`): every BN layer that training
would update gets, as its moving mean (variance), the batch-size-weighted cumulative average of
the batch means (biased variances) the layer itself computes in training mode -- one pass, no
gradients, no optimizer step -- and everything touched is restored. The JAX counterpart is
`keras_swa.backends.jax_batch_norm`.

How, with public TensorFlow/Keras APIs only:

- During the pass each updated layer's `momentum` is 0, so after every batch its moving
  statistics hold that batch's statistics; a `tf.function` (`_ForwardPass`) folds them into
  float32 Neumaier sums (the shared `keras_swa.batch_norm.accumulate`) right after the forward
  pass, and the averages are written back once the whole pass has succeeded. Every other
  non-trainable variable the forward pass may write is backed up and restored.
- Under a `tf.distribute` strategy each global batch is split between the replicas
  (`_split_batch`, as `tf.data` rebatching splits it) and every replica runs the pass on its
  share (`strategy.run`); the sums are added across replicas (and workers) once, at the end.
  With `jit_compile=True` each replica calls its own XLA function over its own copies.
- The compiled pass is kept per model (weakly: it never keeps a model alive) and reused by later
  calls with the same layers, strategy, `jit_compile` and `call_fn` (`_compiled_pass`).
"""

import contextlib
import weakref

import numpy as np
import tensorflow as tf

from keras_swa import batch_norm, distribution

__all__ = ["check_jit_compile", "recompute", "strategy_for"]

# model -> {(strategy id, jit_compile, statistics ids, custom call?): batch_norm.CachedPass}.
# Weak keys, and the passes hold the model (and a `call_fn`) only weakly, so an entry dies with
# its model.
_PASSES = weakref.WeakKeyDictionary()


def strategy_for(model):
    """The strategy of the pass (in scope, else the model's); refuses a replica context."""
    strategy = distribution.check_strategy(distribution.find_strategy(model), "`update_bn`")
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        raise RuntimeError(
            "`update_bn` runs its own per-replica pass and must be called outside "
            "`strategy.run` (in the cross-replica context), e.g. after the training loop."
        )
    return strategy


def check_jit_compile(layers, strategy, jit_compile):
    """Refuses XLA with synchronized BN on several replicas (it reduces across replicas)."""
    synchronized = [layer.name for layer in layers if getattr(layer, "synchronized", False)]
    if jit_compile and synchronized and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            "`jit_compile=True` cannot be combined with synchronized BatchNormalization under a "
            "multi-replica strategy: the cross-replica reduction of the batch statistics cannot "
            "run inside a per-replica XLA function. Pass `jit_compile=False` (TPUStrategy "
            "compiles the pass with XLA by itself). "
            f"Received: jit_compile=True, synchronized layers {synchronized}, "
            f"num_replicas_in_sync={strategy.num_replicas_in_sync}"
        )


def recompute(model, layers, batches, data, steps, progbar, strategy, jit_compile, call_fn):
    """Runs the pass over `batches` in the cross-replica context; returns the sample count."""
    scope = contextlib.nullcontext() if tf.distribute.has_strategy() else strategy.scope()
    with scope:
        return _recompute(
            model, layers, batches, data, steps, progbar, strategy, jit_compile, call_fn
        )


def _recompute(model, layers, batches, data, steps, progbar, strategy, jit_compile, call_fn):
    """The pass itself, in the cross-replica context of `strategy`; returns the sample count."""
    stats = [var for layer in layers for var in batch_norm.layer_statistics(layer)]
    stat_ids = {id(var) for var in stats}
    # Everything else a training-mode forward pass may write to (the statistics of BN layers
    # that are not updated, seed-generator states, ...). Reads of resource variables are
    # copy-on-write, so these backups cost no memory for variables the pass leaves alone.
    others = [var for var in model.non_trainable_variables if id(var) not in stat_ids]
    stat_backup = [tf.convert_to_tensor(var) for var in stats]
    other_backup = [tf.convert_to_tensor(var) for var in others]
    momenta = [layer.momentum for layer in layers]
    num_replicas = strategy.num_replicas_in_sync

    step = _compiled_pass(model, stats, strategy, jit_compile, call_fn)
    size = sum(int(np.prod(var.shape)) for var in stats)

    succeeded = False
    try:
        for layer in layers:
            layer.momentum = 0.0
        for var, value in zip(stats, stat_backup):
            # `0 * inf` is nan: non-finite statistics would poison every batch.
            if not bool(tf.reduce_all(tf.math.is_finite(value))):
                var.assign(tf.where(tf.math.is_finite(value), value, tf.zeros_like(value)))
        state = _per_replica(strategy, lambda _: (tf.zeros([size]), tf.zeros([size])))
        seen = 0
        num_steps = 0
        for x in batches:
            n = batch_norm.batch_size_of(x, data)
            if n == 0:
                continue
            try:
                if num_replicas == 1:
                    inputs = (x, tf.constant(float(n)))
                else:
                    inputs = _split_batch(strategy, x, n)
                state = step(*inputs, state)
            except (ValueError, TypeError, KeyError, tf.errors.InvalidArgumentError) as e:
                raise batch_norm.pass_error(call_fn, num_steps + 1, x, data, e) from e
            seen += n
            num_steps += 1
            if progbar is not None:
                progbar.update(num_steps)
        if seen == 0:
            raise batch_norm.no_data_error(data, steps)
        # One sum over the replicas (and workers) of every replica's compensated sums.
        local_totals = strategy.run(tf.function(lambda s, c: s + c), args=state)
        totals = strategy.reduce(tf.distribute.ReduceOp.SUM, local_totals, axis=None)
        averages = []
        offset = 0
        for var in stats:
            count = int(np.prod(var.shape))
            total = tf.reshape(totals[offset : offset + count], var.shape)
            averages.append(tf.cast(total / seen, var.dtype))
            offset += count
        succeeded = True
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for var, value in zip(others, other_backup):
            var.assign(value)
        if succeeded:
            for var, value in zip(stats, averages):
                var.assign(value)
        else:
            for var, value in zip(stats, stat_backup):
                var.assign(value)
    return seen


def _compiled_pass(model, statistics, strategy, jit_compile, call_fn=None):
    """The model's `tf.function` pass for these statistics, created on first use and reused.

    Traced once per input signature (twice with an uneven last batch); `reduce_retracing`
    keeps inputs whose shapes vary from batch to batch from retracing every batch. A pass with
    a `call_fn` is reused only for the same `call_fn` (the same function object, or an equal
    bound method); a new one replaces it. A `call_fn` that cannot be weakly referenced gets a
    new pass at every call.
    """
    key = (id(strategy), jit_compile, tuple(id(var) for var in statistics), call_fn is not None)
    try:
        passes = _PASSES.setdefault(model, {})
    except TypeError:  # an object that cannot be weakly referenced: no reuse
        passes = {}
    cached = passes.get(key)
    if cached is not None and cached.serves(strategy, call_fn):
        return cached.step
    call_fn_ref = batch_norm.weak_call_fn(call_fn)
    step = tf.function(
        _ForwardPass(model, statistics, strategy, jit_compile, call_fn), reduce_retracing=True
    )
    if call_fn is None or call_fn_ref is not None:
        passes[key] = batch_norm.CachedPass(strategy, call_fn_ref, step)
    else:
        passes.pop(key, None)
    return step


class _ForwardPass:
    """One training-mode forward pass per replica; folds the batch statistics into the sums.

    A callable object rather than a closure, so that `tf.function` keeps the trace statistics of
    every model's pass apart. It holds the model and `call_fn` weakly (when it can): the cache
    of passes must not keep models alive. The caller of `update_bn` holds `call_fn` while the
    pass runs, and `batch_norm.CachedPass.serves` checks it is alive before the pass is reused.
    """

    def __init__(self, model, statistics, strategy, jit_compile, call_fn=None):
        self._model = weakref.ref(model)
        self._custom = call_fn is not None
        ref = batch_norm.weak_call_fn(call_fn)
        # No weak reference possible: held strongly, and this pass is never cached.
        self._call_fn = (lambda: call_fn) if ref is None else ref
        self.statistics = statistics
        self.strategy = strategy
        self.distributed = strategy.num_replicas_in_sync > 1
        self.jit_compile = jit_compile
        self.compiled = {}

    def __call__(self, x, count, state):
        return self.strategy.run(self.replica_step, args=(x, count, state))

    def replica_step(self, x, count, state):
        if not self.jit_compile:
            return self._replica_step(x, count, state)
        # XLA compiles a per-device step under a strategy when each replica calls its own
        # compiled function, which captures that replica's copies of the variables; one function
        # shared by the replicas would read another device's copies. (On TPU the replica id is
        # not static and one program serves every core.)
        replica_id = tf.get_static_value(
            tf.distribute.get_replica_context().replica_id_in_sync_group
        )
        key = None if replica_id is None else int(replica_id)
        if key not in self.compiled:
            self.compiled[key] = tf.function(self._replica_step, jit_compile=True)
        return self.compiled[key](x, count, state)

    def _replica_step(self, x, count, state):
        if not self._custom:
            self._model()(x, training=True)
        else:
            call_fn = self._call_fn()
            if call_fn is None:  # never reused once it is gone (`batch_norm.CachedPass.serves`)
                raise RuntimeError("The `call_fn` of this `update_bn` pass no longer exists.")
            call_fn(self._model(), x)
        # Automatic control dependencies order these reads after the layers' own assignments.
        # In a replica context they read this replica's own copy of the statistics.
        values = [tf.convert_to_tensor(var) for var in self.statistics]
        if self.distributed:
            # A replica with an empty share (a global batch smaller than the number of
            # replicas) computes NaN statistics, which `0 * nan` would carry into its next batch.
            for var, value in zip(self.statistics, values):
                var.assign(tf.where(tf.math.is_finite(value), value, tf.zeros_like(value)))
        return batch_norm.accumulate(*state, values, count)


def _per_replica(strategy, value_fn):
    """`value_fn(replica_id)` on every replica, as a per-replica value (plain on one replica)."""
    if strategy.num_replicas_in_sync == 1:
        return value_fn(0)
    return strategy.experimental_distribute_values_from_function(
        lambda context: value_fn(context.replica_id_in_sync_group)
    )


def _split_batch(strategy, x, n):
    """Splits a global batch of `n` samples between the replicas, as `tf.data` rebatching does.

    Replica `i` (global replica id, so also across workers) gets the `i`-th of
    `num_replicas_in_sync` consecutive shares whose sizes differ by at most one, the larger
    shares first (`numpy.array_split`). Returns per-replica `(x, count)`.
    """
    num_replicas = strategy.num_replicas_in_sync
    small, extra = divmod(n, num_replicas)
    bounds = [0]
    for i in range(num_replicas):
        bounds.append(bounds[-1] + small + (1 if i < extra else 0))

    def share(replica_id):
        start, stop = bounds[replica_id], bounds[replica_id + 1]

        def cut(leaf):
            leaf = tf.convert_to_tensor(leaf)
            return leaf[start:stop] if leaf.shape.rank else leaf

        return tf.nest.map_structure(cut, x), tf.constant(float(stop - start))

    return _per_replica(strategy, share)
