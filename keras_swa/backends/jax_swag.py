"""`SWAG`'s statistics on the JAX backend: `keras.Variable`s updated by ONE `jax.jit` call.

`Statistics` keeps, per tracked variable, the float32 mean, the Welford sum of squared
deviations `M2` and a ring buffer of the last `K` deviation columns, and the capture count. One
compiled program folds a capture into all of them (`keras_swa.averaging.swa_update` and
`welford_m2`, the math the TensorFlow path uses); their buffers are donated to it
(`donate_argnums`), so the new mean, `M2` and columns are written in place (one column of the
ring buffer, `.at[slot].set`). It follows `keras_swa.backends.jax`: weights are read with
`variable.value` at every call (never kept across `fit` steps), the state of a running `fit` is
synced first, the count is int32 unless `jax_enable_x64` (a capture beyond its largest value is
refused), and a refused capture (NaN/Inf, `keras_swa.backends.jax_finite_check`) leaves every
statistic and the count bit for bit as they were.

A draw (`sample`) is one more compiled program, with the noise from `jax.random`: for a seed
`s`, `key = jax.random.key(s)`; the diagonal noise of tracked variable `i` is
`jax.random.normal(jax.random.fold_in(key, i), shape)` and the low-rank noise
`jax.random.normal(jax.random.fold_in(key, n_variables), (K,))`, all float32. Without
`jax_enable_x64`, `jax.random.key` keeps the low 32 bits of the seed.
"""

import jax
import jax.numpy as jnp
import numpy as np

from keras_swa import averaging
from keras_swa.backend import keras
from keras_swa.backends.jax import (
    check_placement,
    copy_as,
    count_dtype,
    replicated_like,
    sync,
)
from keras_swa.backends.jax_finite_check import all_finite, finite_flags

__all__ = ["Statistics"]


def _zeros(shape, name, sharding):
    """A float32 zero `keras.Variable` placed with `sharding` (see `Statistics`)."""
    return keras.Variable(
        jax.device_put(np.zeros(tuple(shape), np.float32), sharding),
        dtype="float32",
        trainable=False,
        name=name,
    )


def _sample(means, m2s, deviations, count, scale, key, diag, cov):
    """One draw `mean + sqrt(scale) * (sqrt(var) * z1 + D z2 / sqrt(rank - 1))`, in float32."""
    max_rank = deviations[0].shape[0]
    n = count.astype(jnp.float32)
    rank = jnp.minimum(n, float(max_rank))
    root = jnp.sqrt(scale)
    z2 = jax.random.normal(jax.random.fold_in(key, len(means)), (max_rank,), jnp.float32)
    samples = []
    for i, (mean, m2, deviation) in enumerate(zip(means, m2s, deviations)):
        noise = jnp.zeros_like(mean)
        if diag:
            z1 = jax.random.normal(jax.random.fold_in(key, i), mean.shape, jnp.float32)
            noise = noise + jnp.sqrt(jnp.maximum(m2 / n, 0.0)) * z1
        if cov:
            # Unfilled columns are zero, so summing over all K columns is the sum over `rank`.
            noise = noise + jnp.tensordot(z2, deviation, axes=[[0], [0]]) / jnp.sqrt(rank - 1.0)
        samples.append(mean + root * noise)
    return samples


class Statistics:
    """The state of `keras_swa.SWAG` on JAX (see the module docstring).

    Args:
        variables: the tracked `keras.Variable`s (floating point).
        max_rank: `K`, the number of deviation columns.
        check: run the NaN/Inf test before folding a capture in.
        model: the model the variables belong to, if any: synced before each read.
    """

    def __init__(self, variables, max_rank, check, model=None):
        self._variables = list(variables)
        self.model = model
        self._check = bool(check)
        sync(model)
        values = [v.value for v in self._variables]
        shapes = [tuple(v.shape) for v in self._variables]
        # Placed as `keras_swa.backends.jax.Averages` places its averages: each mean and sum
        # with its variable's sharding, the deviation columns and the count replicated over the
        # same devices, so that under a `keras.distribution.DataParallel` the update's inputs
        # keep their shardings from call to call (traced once, donated in place on each device).
        self.means = [
            _zeros(s, f"average_{i}", value.sharding)
            for i, (s, value) in enumerate(zip(shapes, values))
        ]
        self.m2s = [
            _zeros(s, f"m2_{i}", value.sharding) for i, (s, value) in enumerate(zip(shapes, values))
        ]
        self.deviations = [
            _zeros((max_rank,) + s, f"deviations_{i}", replicated_like(value))
            for i, (s, value) in enumerate(zip(shapes, values))
        ]
        check_placement(self.means, self._variables, values)
        self.count = keras.Variable(
            jax.device_put(np.zeros([], count_dtype()), replicated_like(values[0])),
            dtype=count_dtype(),
            trainable=False,
            name="n_averaged",
        )
        self.count_limit = int(np.iinfo(count_dtype()).max)
        # How often the update was traced (a Python side effect runs only while tracing).
        self.traces = 0
        self._update = jax.jit(self._update_all, donate_argnums=(0, 1, 2, 3))
        self._flags = jax.jit(finite_flags)
        self._sample = jax.jit(_sample, static_argnames=("diag", "cov"))

    def _state(self):
        return [self.means, self.m2s, self.deviations]

    def _update_all(self, means, m2s, deviations, count, values):
        """`(state, count, values) -> (new state, new count, folded in?)`, pure."""
        self.traces += 1
        n = count
        ok = n < self.count_limit
        if self._check:
            ok = ok & all_finite(values)
        slot = n % deviations[0].shape[0]
        new_means, new_m2s, new_deviations = [], [], []
        for mean, m2, deviation, value in zip(means, m2s, deviations, values):
            value = value.astype(jnp.float32)
            new = averaging.swa_update(mean, value, n)
            m2_new = averaging.welford_m2(m2, value, mean, new, n)
            new_means.append(jnp.where(ok, new, mean))
            new_m2s.append(jnp.where(ok, m2_new, m2))
            # A refused capture writes the slot's own column back: one column, in place.
            column = jnp.where(ok, value - new, deviation[slot])
            new_deviations.append(deviation.at[slot].set(column))
        return new_means, new_m2s, new_deviations, jnp.where(ok, n + 1, n), ok

    def update(self):
        """Folds the current weights in; returns False if the capture was refused."""
        sync(self.model)
        values = [v.value for v in self._variables]  # read now: never kept across steps
        state = [[v.value for v in group] for group in self._state()]
        means, m2s, deviations, count, ok = self._update(*state, self.count.value, values)
        for group, new in zip(self._state(), (means, m2s, deviations)):
            for variable, value in zip(group, new):
                variable.assign(value)
        self.count.assign(count)
        return bool(ok)

    def finite_flags(self):
        """One bool per tracked variable (a NumPy array): are all its values finite?"""
        sync(self.model)
        return np.asarray(self._flags([v.value for v in self._variables]))

    def at_limit(self):
        """Whether the count has reached the largest value its dtype holds."""
        return int(self.count.numpy()) >= self.count_limit

    def sample(self, scale, seed, diag, cov):
        """One draw for the int `seed`: float32 `jax.Array`s in the tracked variables' order."""
        state = [[v.value for v in group] for group in self._state()]
        key = jax.random.key(seed)
        return self._sample(
            *state, self.count.value, jnp.asarray(scale, jnp.float32), key, diag=diag, cov=cov
        )

    def means_values(self):
        """Copies of the means, float32 `jax.Array`s."""
        return [copy_as(m.value, jnp.float32) for m in self.means]

    def variances(self):
        n = jnp.asarray(self.count.value, jnp.float32)
        return [jnp.maximum(m2.value / n, 0.0) for m2 in self.m2s]

    def columns(self, order):
        return [jnp.take(d.value, jnp.asarray(order, jnp.int32), axis=0) for d in self.deviations]

    def arrays(self):
        """`(means, m2s, deviations)` as float32 NumPy arrays (`keras_swa.swag_store`)."""
        return [[np.asarray(v.value) for v in group] for group in self._state()]

    def restore(self, groups, count):
        """Writes `(means, m2s, deviations)` (NumPy, as `arrays` gives them) and `count`,
        each placed as before."""
        for group, values in zip(self._state(), groups):
            for variable, value in zip(group, values):
                variable.assign(
                    jax.device_put(np.asarray(value, np.float32), variable.value.sharding)
                )
        self.count.assign(
            jax.device_put(np.asarray(count, count_dtype()), self.count.value.sharding)
        )

    def reset(self):
        """Zeroes every statistic and the count."""
        for group in self._state():
            for variable in group:
                variable.assign(
                    jax.device_put(np.zeros(variable.shape, np.float32), variable.value.sharding)
                )
        self.count.assign(
            jax.device_put(np.zeros([], count_dtype()), self.count.value.sharding)
        )
