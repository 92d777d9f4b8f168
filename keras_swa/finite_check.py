"""What a refused capture does: the NaN/Inf policy, the same on every backend.

A capture whose weights hold a NaN or an infinity (training diverged) must not reach the
averages. Each backend tests it before the update, as one extra read of the weights: a float32
sum per tensor (a finite total proves every value finite), and the exact per-element test only
when that fails (`keras_swa.backends.tensorflow_finite_check`,
`keras_swa.backends.jax_finite_check`). A capture that fails is refused as a whole. This module
is what follows, per the caller's `nonfinite` policy: `report` names the first bad variable and
raises or warns, and `refused` tells a full count (JAX's int32) from NaN/Inf.
"""

import warnings

from keras_swa import model_variables

__all__ = ["POLICIES", "refused", "report"]

# What an update may do with a non-finite capture: raise, skip it (with a warning), or not check.
POLICIES = ("raise", "skip", "ignore")


def report(flags, variables, nonfinite, n_averaged, poisoned="the average"):
    """Acts on the exact test's flags, per the `nonfinite` policy of the caller.

    Args:
        flags: one bool per variable (a NumPy array), from the exact test.
        variables: the checked variables, for the name of the first bad one.
        nonfinite: `"raise"` or `"skip"`.
        n_averaged: the count kept, for the message.
        poisoned: what the capture would have poisoned, for the message.

    Returns:
        `True` if every flag is set; `False` (after a warning) for a skipped capture.

    Raises:
        FloatingPointError: with `nonfinite="raise"` when a flag is not set.
    """
    if flags.all():
        return True
    bad = variables[int((~flags).argmax())]
    message = (
        f"Non-finite weights (NaN or Inf) in {int((~flags).sum())} of {len(flags)} "
        f"variables, first {model_variables.variable_name(bad)!r}: this capture would poison "
        f"{poisoned} "
        f"(n_averaged={n_averaged} kept as it is)."
    )
    if nonfinite == "raise":
        raise FloatingPointError(message)
    warnings.warn(message + " The capture is skipped.", stacklevel=4)
    return False


def refused(state, variables, nonfinite, owner, poisoned="the average"):
    """Acts on a capture the backend state refused (`state.update()` returned `False`).

    A full count raises (only JAX's int32 count can fill up); otherwise a weight is NaN or
    infinite, and the exact flags (`state.finite_flags()`) go to `report`.

    Args:
        state: the backend state (`keras_swa.backends.*`): `count`, `at_limit`, `finite_flags`.
        variables: the tracked variables, for the name of the first bad one.
        nonfinite: `"raise"` or `"skip"`.
        owner: the public class, for the messages (e.g. `"SWAG"`).
        poisoned: what the capture would have poisoned, for the message.

    Returns:
        `False` (after a warning) for a skipped capture.

    Raises:
        OverflowError: if the count holds its dtype's largest value.
        FloatingPointError: with `nonfinite="raise"`.
    """
    if state.at_limit():
        raise OverflowError(
            f"n_averaged has reached {int(state.count.numpy())}, the largest count its "
            f"dtype ({state.count.dtype}) holds: no further capture can be counted. Enable "
            "64-bit JAX (jax.config.update('jax_enable_x64', True)) before creating the "
            f"{owner} for an int64 count."
        )
    return report(
        state.finite_flags(), variables, nonfinite, int(state.count.numpy()), poisoned
    )
