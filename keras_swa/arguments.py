"""Checks of user arguments shared by keras_swa's entry points.

Keras-style validation rejects `True` where a count is expected (`bool` is an `int` in Python)
and accepts NumPy integers (`numpy.int64(3)` from a config or a `range` over an array).
"""

import numbers

__all__ = ["is_int"]


def is_int(value):
    """Whether `value` is an integer (Python or NumPy), and not a `bool`.

    Example:

    >>> import numpy as np
    >>> [is_int(v) for v in (3, np.int64(3), True, 3.0, "3")]
    [True, True, False, False, False]
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
