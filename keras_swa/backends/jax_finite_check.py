"""The NaN/Inf check of a capture on JAX: a fast test, and the exact one behind it.

The same two-step test as `keras_swa.finite_check` on TensorFlow: a float32 sum per weight
tensor, which is finite exactly when no value is NaN/Inf unless finite values overflow the sum;
only then does the exact per-element test run (`lax.cond`). Both are pure and traced into the
caller's compiled update. `keras_swa.backends.jax.Averages` gives the fast test the small
tensors packed into one float32 array (one sum instead of one per tensor) and the exact test
every tensor on its own, so that its flags name the variable that holds the NaN/Inf.
"""

import jax
import jax.numpy as jnp

__all__ = ["all_finite", "finite_flags", "sums_are_finite"]


def _summable(value):
    # fp16 overflows at 65504 and bf16 sums lose all precision: sum in float32.
    return value.astype(jnp.float32) if value.dtype != jnp.float32 else value


def sums_are_finite(values):
    """The fast test: is the float32 total of every value's sum finite?"""
    total = jnp.zeros([], jnp.float32)
    for value in values:
        total = total + jnp.sum(_summable(value)).astype(jnp.float32)
    return jnp.isfinite(total)


def finite_flags(values):
    """The exact test: one bool per value, are all its elements finite?"""
    return jnp.stack([jnp.all(jnp.isfinite(value)) for value in values])


def all_finite(values):
    """A bool scalar, exact: the fast test, and the per-element one only when it fails."""
    return jax.lax.cond(
        sums_are_finite(values),
        lambda: jnp.asarray(True),
        lambda: jnp.all(finite_flags(values)),
    )
