"""The averaging state on TensorFlow: `tf.Variable`s updated by ONE XLA call per device.

`Averages` keeps one float32 average per tracked variable and the capture count (int64) as
`tf.Variable`s (`keras_swa.state_variables`), and folds the current weights into all of them
with one `tf.function(jit_compile=True)` built from the shared rule. It serves Keras 3 on
TensorFlow and tf_keras alike, with the same interface as `keras_swa.backends.jax.Averages`
where the meaning is the same (`count`, `count_limit`, `update`, `values`, `restore`, `reset`,
`write`, `write_averages`, `finite_flags`, `at_limit`, `sync`). What only TensorFlow has:

- The averages of small variables share one flat variable (`keras_swa.packing`), so the
  compiled call writes one buffer for them instead of one each (only for an elementwise rule).
- Under a `tf.distribute` strategy the variables are mirrored, and the update runs once per
  device on that device's copies (`strategy.extended.update`), from the cross-replica context
  or from inside `strategy.run` (one `merge_call`). MirroredStrategy and
  MultiWorkerMirroredStrategy are what `keras_swa.distribution.check_strategy` lets through.
- `update()` also runs inside a `tf.function`: the NaN/Inf test is then decided in the graph,
  per device, and the result is `None` (a refused capture fails a `tf.debugging.Assert` when
  asked to, `assert_finite`).
- The variables are NOT tracked here: this is a plain object, and the `tf.Module` that owns it
  (`AveragedWeights`) holds `own_averages`, `packed_averages` and `count` under the attribute
  names its checkpoints have always used.
"""

import functools

import numpy as np
import tensorflow as tf

from keras_swa import backend, model_variables, packing
from keras_swa.backends import tensorflow_finite_check
from keras_swa.state_variables import state_variable

__all__ = ["Averages"]


class Averages:
    """The averages and count of `keras_swa.AveragedWeights` on TensorFlow (see module doc).

    Args:
        variables: the tracked variables (Keras variables or `tf.Variable`s, floating point).
        rule: the averaging rule, `(averages, values, n) -> new averages` on lists of float32
            tensors (`AveragedWeights._rule`), traced into the compiled update with `n` the
            count as an int64 scalar.
        check: run the NaN/Inf test before folding a capture in.
        strategy: the `tf.distribute` strategy the averages are made under (mirrored, if it
            has several replicas).
        elementwise: the rule acts on each element alone, so small averages may be packed
            into one flat variable. `False` for a user's rule, which may not be.
        assert_finite: inside a `tf.function`, fail a `tf.debugging.Assert` on a refused
            capture (the graph-mode form of `nonfinite="raise"`).
    """

    def __init__(self, variables, rule, check, strategy, elementwise=True, assert_finite=False):
        self._rule = rule
        self._check = bool(check)
        self._assert_finite = bool(assert_finite)
        self._strategy = strategy
        pack_below = packing.PACK_BELOW if elementwise else 0
        self.layout = packing.Layout([v.shape for v in variables], pack_below)
        layout = self.layout
        with strategy.scope():
            # An average per large variable, one flat average of the small ones, and the count.
            self.own_averages = [
                state_variable(tf.zeros(layout.shapes[i], tf.float32), f"average_{i}")
                for i in layout.own
            ]
            self.packed_averages = (
                state_variable(tf.zeros([layout.packed_size], tf.float32), "packed_averages")
                if layout.packed
                else None
            )
            self.count = state_variable(tf.constant(0, tf.int64), "n_averaged")
        self.count_limit = int(np.iinfo(np.int64).max)
        self._variables = tuple(backend.tf_variable(v) for v in variables)
        self._distributed = strategy.num_replicas_in_sync > 1 or tf.distribute.has_strategy()
        # One compiled update per device, over that device's copies captured by closure: a
        # call then passes no arguments. (Passing the 2 x 214 variables of ResNet-50 as
        # arguments cost ~0.3x the whole update in `tf.function`'s argument handling.) It is
        # traced once, on the first `update()`, and called as a concrete function after.
        self.update_fn = None  # the single-device (or first device's) XLA `tf.function`
        self.device_compiled = {}  # device -> its XLA `tf.function`
        self._device_updates = {}  # "device checked=?" -> the concrete function of its update
        # The exact per-variable test that names a bad variable (rare path; not XLA, so that
        # its temporaries are freed, not kept with a compiled program).
        self._finite_fn = tf.function(tensorflow_finite_check.finite_flags, autograph=False)

    # ------------------------------------------------------------------ the stored averages

    def storage(self):
        """The variables that hold the averages: the own ones, then the packed one if any."""
        packed = [] if self.packed_averages is None else [self.packed_averages]
        return list(self.own_averages) + packed

    def values(self):
        """The averages as float32 tensors, in the order of the tracked variables."""
        own = [tf.convert_to_tensor(a) for a in self.own_averages]
        packed = self.packed_averages
        return self.layout.unpack(own, None if packed is None else tf.convert_to_tensor(packed))

    def restore(self, values, count):
        """Writes `values` (float32 NumPy arrays, tracked order) and `count`."""
        layout = self.layout
        for average, i in zip(self.own_averages, layout.own):
            average.assign(values[i])
        if self.packed_averages is not None:
            self.packed_averages.assign(layout.pack(values))
        self.count.assign(count)

    def reset(self):
        """Zeroes every average and the count."""
        for average in self.storage():
            average.assign(tf.zeros_like(average))
        self.count.assign(0)

    def sync(self, model=None):
        """Nothing to do: TensorFlow's variables always hold the current weights."""

    @staticmethod
    def write(targets, values):
        """Assigns each value, cast to its target's dtype, to each target."""
        for target, value in zip(targets, values):
            target.assign(tf.cast(value, tf.as_dtype(getattr(target, "dtype", tf.float32))))

    def write_averages(self, targets):
        """Writes each average into its target (cast to the target's dtype), tracked order."""
        self.write(targets, self.values())

    @staticmethod
    def keep(targets):
        """Copies of the targets' values, each in its own dtype, for `put_back`."""
        return model_variables.copy_values(targets)

    def put_back(self, targets, kept):
        """Restores what `keep` took, bit for bit."""
        self.write(targets, kept)

    def finite_flags(self):
        """One bool per tracked variable (a NumPy array): are all its values finite?"""
        return self._finite_fn(list(self._variables)).numpy()

    def at_limit(self):
        """Whether the count has reached the largest int64 (never, in practice)."""
        return int(self.count.numpy()) >= self.count_limit

    # ------------------------------------------------------------------ the compiled update

    def _make_update(self, storage, variables, n_averaged):
        """The compiled update of one device's `storage` (see `storage`) from `variables`."""
        rule, layout = self._rule, self.layout
        storage, variables = list(storage), list(variables)

        def update_all():
            n = n_averaged.read_value()
            values = [variables[i] for i in layout.own]
            if layout.packed:
                values.append(layout.pack(variables))
            new = rule([average.read_value() for average in storage], values, n)
            for average, value in zip(storage, new):
                average.assign(value)
            n_averaged.assign_add(1)
            return tf.constant(True)

        return tf.function(update_all, jit_compile=True, autograph=False)

    def _make_checked_update(self, compiled, variables):
        """`compiled` behind the fast NaN/Inf test of `variables`; returns the test's result.

        The test (`tensorflow_finite_check.sums_are_finite`: a sum per stored tensor) runs as
        ordinary TensorFlow ops before the compiled call: measured on ResNet-50's weights,
        TensorFlow's own reductions read faster than XLA-CPU's and, unlike those, leave nothing
        behind (the XLA ones kept ~0.9 MiB of compiled program per tensor).
        """
        layout, variables = self.layout, list(variables)

        def checked():
            values = [variables[i] for i in layout.own]
            if layout.packed:
                values.append(layout.pack(variables))
            finite = tensorflow_finite_check.sums_are_finite(values)
            return tf.cond(finite, compiled, lambda: tf.constant(False))

        return tf.function(checked, autograph=False)

    def _local_update(self, storage, variables, n_averaged, check=True):
        """Runs (building on first use) the update of one device's copies.

        Eagerly this is the checked call alone; `update()` handles a failed fast test. In a
        graph (inside a `tf.function`), a failed fast test is decided here, per device, by
        the exact test, and a capture that passes it is folded in without the fast test.
        """
        check = check and self._check
        device = n_averaged.device
        key = f"{device} checked={check}"
        if key not in self._device_updates:
            compiled = self.device_compiled.get(device)
            if compiled is None:
                compiled = self._make_update(storage, variables, n_averaged)
                self.device_compiled[device] = compiled
                if self.update_fn is None:
                    self.update_fn = compiled
            function = self._make_checked_update(compiled, variables) if check else compiled
            self._device_updates[key] = function.get_concrete_function()
        ok = self._device_updates[key]()
        if not check or tf.executing_eagerly():
            return ok
        variables = list(variables)

        def exact():
            return tf.cond(
                tensorflow_finite_check.all_finite(variables),
                lambda: self._local_update(storage, variables, n_averaged, check=False),
                lambda: tf.constant(False),
            )

        return tf.cond(ok, lambda: tf.constant(True), exact)

    def _update_on_each_device(self, strategy=None, check=True):
        # `extended.update` calls the function once per device with that device's local
        # copies of the averages, the weights and the count: no cross-device traffic.
        strategy = strategy or self._strategy

        def local_update(n_averaged, storage, variables):
            return self._local_update(storage, variables, n_averaged, check)

        results = strategy.extended.update(
            self.count,
            local_update,
            args=(self.storage(), list(self._variables)),
            group=True,
        )
        return tf.reduce_all(
            tf.stack([tf.reshape(r, []) for r in strategy.experimental_local_results(results)])
        )

    def _apply_update(self, check=True):
        """Runs the compiled update on every device; returns the (bool scalar) all-finite flag."""
        if not self._distributed:
            return self._local_update(self.storage(), self._variables, self.count, check)
        update = functools.partial(self._update_on_each_device, check=check)
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            # Inside `strategy.run`: step out to the cross-replica context once.
            return tf.distribute.get_replica_context().merge_call(update)
        if tf.distribute.has_strategy():
            return update()
        with self._strategy.scope():
            return update()

    def update(self):
        """Folds the current weights in (one compiled call per device) and counts the capture.

        Returns:
            Eagerly, `True` if the capture was folded in and `False` if it was refused
            (NaN/Inf; the caller names the bad variables with `finite_flags`). Inside a
            `tf.function`, `None`: the check ran in the graph (see `assert_finite`).
        """
        ok = self._apply_update()
        if not self._check:
            return True if tf.executing_eagerly() else None
        if not tf.executing_eagerly():
            if self._assert_finite:
                tf.debugging.Assert(ok, ["Non-finite weights: SWA capture refused."])
            return None
        if bool(ok):
            return True
        # Rare path: the exact test decides. Finite weights whose sum overflowed (the fast
        # test's only false alarm) are folded in after all, without the fast test.
        if self.finite_flags().all():
            return bool(self._apply_update(check=False))
        return False
