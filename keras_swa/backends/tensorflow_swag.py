"""`SWAG`'s statistics on TensorFlow: `tf.Variable`s updated by ONE XLA call per device.

`Statistics` keeps, per tracked variable, the float32 mean, the Welford sum of squared
deviations `M2` and a ring buffer of the last `K` deviation columns, and the int64 capture
count, as `tf.Variable`s (`keras_swa.state_variables`). One `tf.function(jit_compile=True)`
folds a capture into all of them (`keras_swa.averaging.swa_update` and `welford_m2`, the math
the JAX path uses); a draw (`sample`) is one more, with the noise from
`tf.random.stateless_normal`. It serves Keras 3 on TensorFlow and tf_keras alike, with the
interface of `keras_swa.backends.jax_swag.Statistics` (`means`, `m2s`, `deviations`, `count`,
`update`, `finite_flags`, `at_limit`, `sample`, `means_values`, `variances`, `columns`,
`reset`). What only TensorFlow has:

- Under a `tf.distribute` strategy the statistics are mirrored and the update runs once per
  device on that device's copies (`strategy.extended.update`), from the cross-replica context
  or from inside `strategy.run` (one `merge_call`).
- `update()` also runs inside a `tf.function`: the NaN/Inf test is then decided in the graph,
  and the result is `None` (a refused capture is left out, and fails a `tf.debugging.Assert`
  when asked to, `assert_finite`).
- A draw's seed is a pair of ints (`tf.random.stateless_normal`'s), not one.
- The variables are NOT tracked here: this is a plain object, and the `tf.Module` that owns it
  (`SWAG`) holds them under the attribute names its checkpoints have always used.
"""

import numpy as np
import tensorflow as tf

from keras_swa import averaging, backend
from keras_swa.backends import tensorflow_finite_check
from keras_swa.state_variables import state_variable

__all__ = ["Statistics"]


def _swag_update(averages, m2s, deviations, variables, n_averaged, ok, max_rank):
    """One capture: Welford's mean and M2, and the column `w - new_mean` at slot `n % K`.

    With `ok` False (a refused capture) every statistic and the count keep their values.
    """
    n = n_averaged.read_value()
    slot = tf.math.floormod(n, max_rank)
    for average, m2, deviation, variable in zip(averages, m2s, deviations, variables):
        value = tf.cast(variable, tf.float32)
        old = average.read_value()
        new = averaging.swa_update(old, value, n)
        old_m2 = m2.read_value()
        m2.assign(tf.where(ok, averaging.welford_m2(old_m2, value, old, new, n), old_m2))
        average.assign(tf.where(ok, new, old))
        # A scatter into the read value, then one assign: XLA updates the buffer in place, and
        # (unlike `Variable.scatter_nd_update`) it works on mirrored variables under a strategy.
        columns = deviation.read_value()
        index = tf.reshape(slot, [1, 1])
        column = tf.where(ok, value - new, tf.gather_nd(columns, index)[0])
        deviation.assign(tf.tensor_scatter_nd_update(columns, index, tf.expand_dims(column, 0)))
    n_averaged.assign_add(tf.cast(ok, n_averaged.dtype))


def _swag_sample(averages, m2s, deviations, n_averaged, scale, seed, diag, cov, max_rank):
    """One draw `mean + sqrt(scale) * (sqrt(var) * z1 + D z2 / sqrt(rank - 1))`, in fp32."""
    n = tf.cast(n_averaged, tf.float32)
    rank = tf.minimum(n, float(max_rank))
    root = tf.sqrt(scale)
    z2 = tf.random.stateless_normal(
        [max_rank], seed=tf.random.experimental.stateless_fold_in(seed, len(averages))
    )
    samples = []
    for i, (average, m2, deviation) in enumerate(zip(averages, m2s, deviations)):
        noise = tf.zeros_like(average)
        if diag:
            z1 = tf.random.stateless_normal(
                average.shape, seed=tf.random.experimental.stateless_fold_in(seed, i)
            )
            noise += tf.sqrt(tf.maximum(m2 / n, 0.0)) * z1
        if cov:
            # Unfilled columns are zero, so summing over all K columns is the sum over `rank`.
            low_rank = tf.tensordot(z2, deviation, axes=[[0], [0]])
            noise += low_rank / tf.sqrt(rank - 1.0)
        samples.append(average + root * noise)
    return samples


def _statistic(shape, name):
    return state_variable(tf.zeros(shape, tf.float32), name)


class Statistics:
    """The state of `keras_swa.SWAG` on TensorFlow (see the module docstring).

    Args:
        variables: the tracked variables (Keras variables or `tf.Variable`s, floating point).
        max_rank: `K`, the number of deviation columns.
        check: run the NaN/Inf test before folding a capture in.
        strategy: the `tf.distribute` strategy the statistics are made under.
        assert_finite: inside a `tf.function`, fail a `tf.debugging.Assert` on a refused
            capture (the graph-mode form of `nonfinite="raise"`).
    """

    def __init__(self, variables, max_rank, check, strategy, assert_finite=False):
        self._check = bool(check)
        self._assert_finite = bool(assert_finite)
        self._strategy = strategy
        with strategy.scope():
            self.means = [_statistic(v.shape, f"average_{i}") for i, v in enumerate(variables)]
            self.count = state_variable(tf.constant(0, tf.int64), "n_averaged")
            self.m2s = [_statistic(v.shape, f"m2_{i}") for i, v in enumerate(variables)]
            self.deviations = [
                _statistic([max_rank] + list(v.shape), f"deviations_{i}")
                for i, v in enumerate(variables)
            ]
        self.count_limit = int(np.iinfo(np.int64).max)
        self._variables = tuple(backend.tf_variable(v) for v in variables)
        self._distributed = strategy.num_replicas_in_sync > 1 or tf.distribute.has_strategy()
        self._finite_fn = tf.function(tensorflow_finite_check.finite_flags, autograph=False)
        self._update_fn = tf.function(
            lambda a, m, d, v, n, ok: _swag_update(a, m, d, v, n, ok, max_rank),
            jit_compile=True,
            autograph=False,
        )
        self._sample_fn = tf.function(
            lambda a, m, d, n, scale, seed, diag, cov: _swag_sample(
                a, m, d, n, scale, seed, diag, cov, max_rank
            ),
            jit_compile=True,
            autograph=False,
        )

    def _state(self):
        return (list(self.means), list(self.m2s), list(self.deviations))

    # ------------------------------------------------------------------ the update

    def update(self):
        """Folds the current weights in (one compiled call per device) and counts the capture.

        Returns:
            Eagerly, `True` if the capture was taken and `False` if it was refused (NaN/Inf;
            the caller names the bad variables with `finite_flags`). Inside a `tf.function`,
            `None`: the check ran in the graph (see `assert_finite`).
        """
        variables = list(self._variables)
        if not self._check:
            self._apply_update(tf.constant(True))
            return True if tf.executing_eagerly() else None
        if not tf.executing_eagerly():
            finite = tf.reduce_all(self._finite_fn(variables))
            if not self._assert_finite:
                self._apply_update(finite)
                return None
            with tf.control_dependencies(
                [tf.debugging.Assert(finite, ["Non-finite weights: SWAG capture refused."])]
            ):
                self._apply_update(finite)
            return None
        if not self.finite_flags().all():
            return False
        self._apply_update(tf.constant(True))
        return True

    def _apply_update(self, ok):
        averages, m2s, deviations = self._state()
        variables = list(self._variables)
        if not self._distributed:
            self._update_fn(averages, m2s, deviations, variables, self.count, ok)
        elif tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            tf.distribute.get_replica_context().merge_call(
                lambda strategy: self._update_on_each_device(ok, strategy)
            )
        elif tf.distribute.has_strategy():
            self._update_on_each_device(ok)
        else:
            with self._strategy.scope():
                self._update_on_each_device(ok)

    def _update_on_each_device(self, ok, strategy=None):
        strategy = strategy or self._strategy

        def local_update(n_averaged, averages, m2s, deviations, variables):
            self._update_fn(list(averages), list(m2s), list(deviations), list(variables),
                            n_averaged, ok)

        strategy.extended.update(
            self.count,
            local_update,
            args=(*self._state(), list(self._variables)),
            group=True,
        )

    def finite_flags(self):
        """One bool per tracked variable (a NumPy array): are all its values finite?"""
        return self._finite_fn(list(self._variables)).numpy()

    def at_limit(self):
        """Whether the count has reached the largest int64 (never, in practice)."""
        return int(self.count.numpy()) >= self.count_limit

    def reset(self):
        """Zeroes every statistic and the count."""
        for variable in [v for group in self._state() for v in group]:
            variable.assign(tf.zeros_like(variable))
        self.count.assign(0)

    def arrays(self):
        """`(means, m2s, deviations)` as float32 NumPy arrays (`keras_swa.swag_store`)."""
        return [[v.numpy() for v in group] for group in self._state()]

    def restore(self, groups, count):
        """Writes `(means, m2s, deviations)` (NumPy, as `arrays` gives them) and `count`."""
        for group, values in zip(self._state(), groups):
            for variable, value in zip(group, values):
                variable.assign(value)
        self.count.assign(count)

    # ------------------------------------------------------------------ reading

    def means_values(self):
        """The means, float32 tensors (a snapshot)."""
        return [tf.convert_to_tensor(a) for a in self.means]

    def variances(self):
        """The diagonal variance (ddof=0) of the captures, float32 tensors."""
        n = tf.cast(self.count, tf.float32)
        return [tf.maximum(m2 / n, 0.0) for m2 in self.m2s]

    def columns(self, order):
        """The deviation columns at the ring-buffer slots `order`, per tracked variable."""
        return [tf.gather(d, order) for d in self.deviations]

    def sample(self, scale, seed, diag, cov):
        """One draw for the seed pair `seed` (2 ints): float32 tensors, tracked order."""
        averages, m2s, deviations = self._state()
        return self._sample_fn(
            averages, m2s, deviations, self.count, tf.constant(float(scale)),
            tf.constant(seed, tf.int64), diag, cov,
        )
