"""The NaN/Inf check of a capture on TensorFlow: a fast test before the update, an exact one.

A capture whose weights hold a NaN or an infinity (training diverged) must not reach the
averages, and it must be refused as a whole, so the check finishes before the first average is
written: it is one extra read of the weights, and should cost no more than that read. What a
refused capture then does (raise, skip) is shared: `keras_swa.finite_check`.

`sums_are_finite` is the fast test: one plain `reduce_sum` per tensor, run as ordinary
TensorFlow ops in the same graph call as (and before) the XLA-compiled update. A sum is NaN or
infinite whenever a value is, so a finite total proves every value finite. The converse fails
only when finite weights of enormous size (~1e31 on average, or single values near the float32
limit of 3.4e38) overflow the sum: then `all_finite`, the exact per-element test, decides.
Measured on 100M floats and on ResNet-50's weights: inside XLA-CPU an elementwise step before
the reduction (`x * 0`, `abs`, `is_finite`) was materialised as a full temporary copy of the
weights, folding slices first made the compiled program grow by ~4-8 MiB per tensor, and even
plain XLA sums kept ~0.9 MiB per tensor; TensorFlow's own reductions read as fast or faster
and keep nothing. The JAX counterpart is `keras_swa.backends.jax_finite_check`.
"""

import tensorflow as tf

__all__ = ["all_finite", "finite_flags", "sums_are_finite"]


def _summable(values):
    """`values` in a dtype whose sum of finite values does not overflow in practice."""
    if values.dtype == tf.float16:  # fp16 overflows at 65504: sum in float32
        return tf.cast(values, tf.float32)
    return values


def sums_are_finite(values):
    """A bool scalar: are the sums of all `values` finite? (The fast test; see module doc.)

    Args:
        values: float tensors of any shape (read in place; not cast, except float16).

    Returns:
        A scalar bool tensor. `True` proves every value finite; `False` means a value is NaN
        or infinite, or (rarely) that finite values overflowed a sum.
    """
    sums = [tf.cast(tf.reduce_sum(tf.reshape(_summable(v), [-1])), tf.float32) for v in values]
    if not sums:
        return tf.constant(True)
    return tf.math.is_finite(tf.add_n(sums))


def finite_flags(variables):
    """One bool per variable: are all its values finite? (Exact, per element.)"""
    return tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in variables])


def all_finite(variables):
    """A bool scalar: are all values of all `variables` finite? (Exact, per element.)"""
    return tf.reduce_all(finite_flags(variables))
