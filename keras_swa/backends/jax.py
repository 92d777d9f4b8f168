"""The averaging state on the JAX backend: `keras.Variable`s updated by ONE `jax.jit` call.

`Averages` keeps the float32 averages and the capture count as non-trainable `keras.Variable`s,
and folds the current weights into all of them with a single compiled program built from the
shared math of `keras_swa.averaging`. The averages' buffers and the count are donated to that
program (`donate_argnums`), so XLA writes the new averages into the same memory: the update
holds no second copy of the averages. The program is traced once; later calls with the same
shapes and dtypes reuse it.

As on TensorFlow (`keras_swa.packing`), every variable smaller than `packing.PACK_BELOW` floats
keeps its average as a slice of ONE flat float32 variable, and every larger one has its own:
each buffer the program writes is one more output (and, on XLA:CPU, one more kernel), and
ResNet-50's 162 small tensors (0.4% of its weights) as 162 outputs cost ~0.15x the floor of
the whole update, plus a Python `assign` each. A rule known to be elementwise (`elementwise`:
the built-in SWA and EMA) is applied to the flat average as one array, as on TensorFlow; any
other rule (a user's `avg_fn`/`multi_avg_fn`) is given one average per tracked variable, of
that variable's shape (a slice of the flat one for a packed variable), so it sees what it would
see unpacked, at the cost of a few more small kernels (`_pack_computed`).

JAX specifics this module follows:

- On JAX, Keras' `fit` runs a stateless, jitted train step whose inputs are donated, and writes
  the new state back into the `keras.Variable`s between steps (`Callback.model` syncs it). A
  `jax.Array` taken from a variable before a step can be a deleted buffer after it, so the
  weights are read with `variable.value` at every call and no array is kept between calls.
- The same train step donates the model's variables' arrays, and the update donates the
  averages': an array must never be both. Whatever goes from the averages into a model, or out
  to the caller, is a fresh copy (`copy_as`, `values`).
- JAX computes in 32 bits unless `jax_enable_x64` is set, so the count is an int32 there
  (int64 with x64). It is exact up to 2**31 - 1 captures -- 68 years at one capture per second
  -- and a capture beyond that is refused (`OverflowError`), never wrapped around.
- The NaN/Inf check is the same two-step test as on TensorFlow
  (`keras_swa.backends.tensorflow_finite_check`): a
  float32 sum per large weight tensor and one over the small ones packed together, which is
  finite exactly when no value is NaN/Inf unless finite values overflow the sum; only then does
  the exact per-element test run (`lax.cond`). A refused capture leaves every average and the
  count bit for bit as they were (`where(ok, new, old)`, fused into the update's loop). The
  check must finish before the first average is written, so it is a second read of the
  weights; on XLA:CPU its sums (YNNPACK reductions) read at about half the speed of the
  update's elementwise loops, which makes the checked update ~1.7-2.2x the floor, not the
  1.33x that its bytes alone would cost (`benchmarks/averaging_benchmark.py`).
- Under a `keras.distribution.DataParallel` (`keras_swa.distribution.check_keras_distribution`)
  the variables are replicated over the mesh. Each own average is placed with its variable's
  sharding, the flat average of the small ones and the count replicated over the same devices,
  whether or not the distribution is still in effect when the averages are made; reset and
  restored values keep those placements.
  The inputs' shardings are then the same at every call, so the update is traced once, and the
  donated buffers are reused in place on every device.
"""

import jax
import jax.numpy as jnp
import numpy as np

from keras_swa import packing
from keras_swa.backend import keras
from keras_swa.backends import jax_finite_check

__all__ = ["Averages", "check_placement", "copy_as", "count_dtype", "pack", "replicated_like", "sync", "unpack"]


def count_dtype():
    """The dtype of the capture count: int64 with `jax_enable_x64`, else int32."""
    return "int64" if jax.config.jax_enable_x64 else "int32"


def copy_as(value, dtype):
    """A new array holding `value` in `dtype` (never `value`'s own buffer, see the module doc)."""
    return jnp.array(value, dtype=dtype, copy=True)


def replicated_like(array):
    """The sharding that replicates a scalar over the devices holding `array`, in their order."""
    sharding = array.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise NotImplementedError(
        "keras_swa places its state with the variables' shardings, which Keras makes "
        "NamedSharding (under a keras.distribution) or SingleDeviceSharding. "
        f"Received: sharding={sharding!r}"
    )


def check_placement(averages, variables, values):
    """Raises `ValueError` if an average is not placed as its variable's value.

    A distribution set after the model was built lays new `keras.Variable`s out apart from
    the model's: every update would move them (or fail).

    Args:
        averages: one `keras.Variable` per tracked variable, placed as that variable.
        variables: the tracked variables, for the message.
        values: their current `jax.Array`s.
    """
    for i, (average, value) in enumerate(zip(averages, values)):
        if not average.value.sharding.is_equivalent_to(value.sharding, value.ndim):
            raise ValueError(
                f"The average of variable {i} ({getattr(variables[i], 'path', '')!r}) "
                "would be placed apart from the variable: the model was built outside the "
                "keras.distribution now in effect. Build the model under the distribution "
                "(or create the averages without it). "
                f"Received: variable sharding={value.sharding}, "
                f"average sharding={average.value.sharding}"
            )


def _placed(value, sharding):
    """`value` (NumPy) as a `jax.Array` placed with `sharding`."""
    return jax.device_put(value, sharding)


def sync(model):
    """Writes the state of a running `fit` of `model` back into its variables.

    During `fit`, Keras' JAX trainer keeps the training state outside the variables (they can
    even be emptied) and writes it back at epoch ends, or when a callback reads
    `Callback.model`; `model.jax_state_sync()` is what that property calls. Reading or writing
    the variables without it would see or overwrite stale values.
    """
    state_sync = getattr(model, "jax_state_sync", None)
    if state_sync is not None:
        state_sync()


def pack(layout, values):
    """One flat float32 array of the packed variables' `values` (`packing.Layout.pack` on JAX).

    Args:
        layout: the `keras_swa.packing.Layout` of the tracked variables.
        values: the value of every tracked variable, in order (only the packed ones are read).
    """
    return jnp.concatenate([jnp.ravel(values[i]).astype(jnp.float32) for i in layout.packed])


# How many computed views one concatenation fuses (see `_pack_computed`).
_FUSED_VIEWS = 8


def _pack_computed(layout, values):
    """`pack` for values computed from views of the flat average (the per-view rule).

    XLA:CPU fuses a concatenation with a few computed operands into one kernel, but not one
    with 162 (ResNet-50's small tensors): each would be a kernel of its own, ~0.1x of the
    floor. Concatenating groups of `_FUSED_VIEWS`, each kept a group by an
    `optimization_barrier` (XLA would otherwise flatten the nested concatenations), makes ~20
    kernels, measured as fast as applying the rule to the flat average at once.
    """
    parts = [jnp.ravel(values[i]).astype(jnp.float32) for i in layout.packed]
    groups = [
        jax.lax.optimization_barrier(jnp.concatenate(parts[j:j + _FUSED_VIEWS]))
        for j in range(0, len(parts), _FUSED_VIEWS)
    ]
    return jnp.concatenate(groups)


def unpack(layout, own_values, packed_value):
    """The value of every tracked variable, in order, from the own and packed storage (JAX)."""
    out = [None] * len(layout.shapes)
    for i, value in zip(layout.own, own_values):
        out[i] = value
    for i, offset in zip(layout.packed, layout.offsets):
        out[i] = jnp.reshape(packed_value[offset:offset + layout.sizes[i]], layout.shapes[i])
    return out


class Averages:
    """The averages and count of `keras_swa.AveragedWeights` on JAX (see the module docstring).

    Args:
        variables: the tracked `keras.Variable`s (floating point).
        rule: the averaging rule, `(averages, values, n) -> new averages` on lists of float32
            arrays (`AveragedWeights._rule`: SWA, EMA with its decay schedule, or the user's
            `avg_fn`), traced into the one compiled update with `n` the count as a scalar.
            Unless `elementwise`, it is given one average per tracked variable, of that
            variable's shape (the packed ones as views of the flat average), so any rule sees
            what it would see unpacked.
        check: run the NaN/Inf test before folding a capture in.
        model: the model the variables belong to, if any: synced (`sync`) before each read.
        pack_below: variables with fewer elements than this share one flat average
            (`keras_swa.packing`); 0 gives every variable its own. Defaults to
            `packing.PACK_BELOW`.
        elementwise: whether `rule` computes each element of a new average from the same
            element of the old average and of the value alone, whatever the shapes (true of
            the built-in SWA and EMA rules, not promised by a user's `avg_fn`). Then the rule
            is applied to the flat average as one array, as on TensorFlow: one kernel for all
            the small variables. Otherwise (the default) it is applied to one view per
            packed variable, and the new views are concatenated (`_pack_computed`): always
            correct, ~20 small kernels more on ResNet-50 (measured ~0.04x of the floor).
    """

    def __init__(
        self,
        variables,
        rule,
        check,
        model=None,
        pack_below=packing.PACK_BELOW,
        elementwise=False,
    ):
        self._elementwise = bool(elementwise)
        self._variables = list(variables)
        self.model = model
        self._rule = rule
        self._check = bool(check)
        sync(model)
        values = [v.value for v in self._variables]
        self.layout = layout = packing.Layout([v.shape for v in self._variables], pack_below)
        # The stored averages: one per large variable (placed as that variable), then the flat
        # one of the small variables, replicated as they are (Keras' DataParallel replicates
        # every variable; the check below refuses anything else).
        self.storage = [
            keras.Variable(
                _placed(np.zeros(layout.shapes[i], np.float32), values[i].sharding),
                dtype="float32",
                trainable=False,
                name=f"average_{i}",
            )
            for i in layout.own
        ]
        if layout.packed:
            self.storage.append(
                keras.Variable(
                    _placed(
                        np.zeros([layout.packed_size], np.float32),
                        replicated_like(values[layout.packed[0]]),
                    ),
                    dtype="float32",
                    trainable=False,
                    name="packed_averages",
                )
            )
        self.count = keras.Variable(
            _placed(np.zeros([], count_dtype()), replicated_like(values[0])),
            dtype=count_dtype(),
            trainable=False,
            name="n_averaged",
        )
        check_placement(self.averages, self._variables, values)
        self.count_limit = int(np.iinfo(count_dtype()).max)
        # How often the update was traced (a Python side effect runs only while tracing).
        self.traces = 0
        self._update = jax.jit(self._update_all, donate_argnums=(0, 1))
        self._flags = jax.jit(jax_finite_check.finite_flags)
        self._unpack = jax.jit(self._stored_values)

    @property
    def averages(self):
        """For each tracked variable, in order, the `keras.Variable` holding its average: its
        own, or the flat one shared by the packed small variables (see `storage`)."""
        own = dict(zip(self.layout.own, self.storage))
        packed = self.storage[-1] if self.layout.packed else None
        return [own.get(i, packed) for i in range(len(self.layout.shapes))]

    def _stored_values(self, storage):
        """Every tracked variable's average, in order, from the stored arrays (pure)."""
        layout = self.layout
        own = list(storage[: len(layout.own)])
        return unpack(layout, own, storage[-1] if layout.packed else None)

    def _update_all(self, storage, count, values):
        """`(storage, count, values) -> (new storage, new count, folded in?)`, pure."""
        self.traces += 1
        layout = self.layout
        n = count
        ok = n < self.count_limit
        # The values in the storage's order: each large one, then the small ones packed.
        stored_values = [values[i] for i in layout.own]
        if layout.packed:
            stored_values.append(pack(layout, values))
        if self._check:
            # One float32 sum per large value and one for all the small ones together; the
            # exact test runs only when that fast one fails (NaN/Inf, or a sum overflowed).
            ok = ok & jax.lax.cond(
                jax_finite_check.sums_are_finite(stored_values),
                lambda: jnp.asarray(True),
                lambda: jnp.all(jax_finite_check.finite_flags(values)),
            )
        if self._elementwise or not layout.packed:
            new = list(self._rule(list(storage), stored_values, n))
        else:
            updated = self._rule(self._stored_values(storage), list(values), n)
            new = [updated[i] for i in layout.own] + [_pack_computed(layout, updated)]
        new = [jnp.where(ok, u, average) for u, average in zip(new, storage)]
        return new, jnp.where(ok, n + 1, n), ok

    def update(self):
        """Folds the current weights in; returns False if the capture was refused."""
        sync(self.model)
        values = [v.value for v in self._variables]  # read now: never kept across steps
        storage = [a.value for a in self.storage]
        new, count, ok = self._update(storage, self.count.value, values)
        for variable, value in zip(self.storage, new):
            variable.assign(value)
        self.count.assign(count)
        return bool(ok)

    def sync(self, model=None):
        """`sync(model)`, by default of the model the averages were made from."""
        sync(self.model if model is None else model)

    @staticmethod
    def write(targets, values):
        """Assigns a fresh copy of each value, cast to its target's dtype, to each target."""
        for target, value in zip(targets, values):
            target.assign(copy_as(value, target.dtype))

    def _averages(self):
        """Each tracked variable's average, tracked order: the own averages' arrays (no copy),
        the packed ones as new arrays sliced out of the flat average (one compiled call)."""
        if not self.layout.packed:
            return [average.value for average in self.storage]
        return self._unpack([average.value for average in self.storage])

    def write_averages(self, targets):
        """Writes each average into its target (cast to the target's dtype), tracked order.

        Each average is copied once (from its own array, or once sliced out of the flat
        average; not from `values()`, a copy of each): a `swap` then holds one extra copy of
        the weights, not two.
        """
        self.write(targets, self._averages())

    @staticmethod
    def keep(targets):
        """The targets' values, for `put_back`: their arrays themselves, no copy.

        A `jax.Array` is immutable, and once the averages are assigned the variable no longer
        holds it, so nothing can donate or change it: a reference is a copy.
        """
        return [target.value for target in targets]

    @staticmethod
    def put_back(targets, kept):
        """Restores what `keep` took, bit for bit: the variables' own former arrays, which
        nothing has donated since, so handing them back needs no copy."""
        for target, value in zip(targets, kept):
            target.assign(value)

    def finite_flags(self):
        """One bool per tracked variable (a NumPy array): are all its values finite?"""
        sync(self.model)
        return np.asarray(self._flags([v.value for v in self._variables]))

    def at_limit(self):
        """Whether the count has reached the largest value its dtype holds."""
        return int(self.count.numpy()) >= self.count_limit

    def values(self):
        """Copies of the averages, float32 `jax.Array`s in the order of the tracked variables."""
        return [copy_as(a, jnp.float32) for a in self._averages()]

    def restore(self, values, count):
        """Writes `values` (float32 NumPy arrays, tracked order) and `count`, placed as before."""
        layout = self.layout
        stored = [np.asarray(values[i], np.float32) for i in layout.own]
        if layout.packed:
            stored.append(
                np.concatenate([np.asarray(values[i], np.float32).ravel() for i in layout.packed])
            )
        for average, value in zip(self.storage, stored):
            average.assign(_placed(value, average.value.sharding))
        self.count.assign(_placed(np.asarray(count, count_dtype()), self.count.value.sharding))

    def reset(self):
        """Zeroes every average and the count."""
        self.restore([np.zeros(shape, np.float32) for shape in self.layout.shapes], 0)
