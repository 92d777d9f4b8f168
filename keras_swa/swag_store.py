"""What `SWAG.save_own_variables` puts in a Keras-style store, and the checks on load.

A store is dict-like with string keys and NumPy values (Keras' own H5 store, a plain `dict`, or
the `.weights.h5` file of `keras_swa.weights_file`). It holds SWAG's whole state, so that a
restored SWAG draws and predicts as the saved one did: `"mean_0"`, `"m2_0"`, `"deviations_0"`,
... per tracked variable in order (fp32: the mean, the Welford sum of squared deviations, and the
`(max_rank,) + shape` ring buffer of deviation columns as stored, slot `i % max_rank` for capture
`i`); `"n_averaged"`, the count (int64); and `"fingerprint"`, `max_rank` and the tracked shapes as
UTF-8 JSON bytes. On load everything is read and checked before anything is written, so a store
from other variables or another `max_rank` raises a `ValueError` naming the difference and
changes nothing. The same on every backend.
"""

import numpy as np

from keras_swa import model_variables, stores

__all__ = ["FORMAT", "GROUPS", "fill", "fingerprint", "read"]

FORMAT = "keras_swa.SWAG"
# The statistics per tracked variable, in the order `fill` takes and `read` returns them.
GROUPS = ("mean", "m2", "deviations")


def fingerprint(max_rank, variables):
    """What a store must match: `max_rank` and the tracked shapes.

    Example:

    >>> import numpy as np
    >>> fingerprint(3, [np.zeros((2, 3))])["shapes"]
    [[2, 3]]
    """
    shapes = [[int(d) for d in v.shape] for v in variables]
    return {"format": FORMAT, "max_rank": int(max_rank), "shapes": shapes}


def fill(store, mine, groups, count):
    """Writes the fingerprint `mine`, the count and `groups` (means, m2s, deviations) to `store`."""
    stores.write_fingerprint(store, mine)
    stores.write_count(store, count)
    for name, values in zip(GROUPS, groups):
        for i, value in enumerate(values):
            store[f"{name}_{i}"] = np.asarray(value, np.float32)


def read(store, mine, variables, count_limit):
    """The checked `(means, m2s, deviations)` (fp32 NumPy arrays) and count of `store`.

    Args:
        store: a dict-like written by `fill`.
        mine: the fingerprint of the SWAG that loads it (`fingerprint`).
        variables: the tracked variables, for the name of a mismatched one.
        count_limit: the largest count the loading backend holds (JAX without x64: int32).

    Raises:
        ValueError: naming what differs, if the store does not match.
    """

    saved = stores.read_fingerprint(store, FORMAT, "SWAG")
    if saved["max_rank"] != mine["max_rank"]:
        raise ValueError(
            f"The store was saved by a SWAG with max_rank={saved['max_rank']}, this SWAG has "
            f"max_rank={mine['max_rank']}: they must match. Received: max_rank={saved['max_rank']}"
        )
    if saved["shapes"] != mine["shapes"]:
        raise ValueError(
            f"The store holds the statistics of variables of shapes {saved['shapes']}, this "
            f"SWAG tracks {mine['shapes']}. Received: saved shapes={saved['shapes']}"
        )
    groups = []
    for name in GROUPS:
        values = []
        for i, (shape, variable) in enumerate(zip(mine["shapes"], variables)):
            expected = ([mine["max_rank"]] if name == "deviations" else []) + shape
            value = stores.entry(store, f"{name}_{i}", "SWAG")
            if list(value.shape) != expected:
                raise ValueError(
                    f"The saved {name} of variable {i} "
                    f"({model_variables.variable_name(variable)!r}) has shape "
                    f"{tuple(value.shape)}, not {tuple(expected)}. "
                    f"Received: {name}_{i} of shape {tuple(value.shape)}"
                )
            values.append(value.astype(np.float32))
        groups.append(values)
    return groups, stores.read_count(store, "SWAG", count_limit)
