"""What `AveragedWeights.save_own_variables` puts in a Keras-style store, and the checks on load.

A store is dict-like with string keys and NumPy values (Keras' own H5 store, a plain `dict`, or
the `.weights.h5` file of `keras_swa.weights_file`). It holds `"0"`, `"1"`, ... the fp32 average
of each tracked variable in order; `"n_averaged"`, the count (int64); and `"fingerprint"`, the
averaging rule and the tracked shapes as UTF-8 JSON bytes. On load everything is read and
checked before anything is written, so a store from other variables or another rule raises a
`ValueError` naming the difference and changes nothing. The same on every backend.
"""

import numpy as np

from keras_swa import model_variables, stores

__all__ = ["FORMAT", "fill", "fingerprint", "read"]

FORMAT = "keras_swa.AveragedWeights"


def fingerprint(rule, variables):
    """What a store must match: the rule's name (`"swa"`, `"ema"`, `"avg_fn"`, ...) and shapes.

    Example:

    >>> import numpy as np
    >>> fingerprint("swa", [np.zeros((2, 3))])["shapes"]
    [[2, 3]]
    """
    shapes = [[int(d) for d in v.shape] for v in variables]
    return {"format": FORMAT, "rule": rule, "shapes": shapes}


def fill(store, mine, averages, count):
    """Writes the fingerprint `mine`, the count and the `averages` (fp32) into `store`."""
    stores.write_fingerprint(store, mine)
    stores.write_count(store, count)
    for i, average in enumerate(averages):
        store[str(i)] = np.asarray(average, np.float32)


def read(store, mine, variables, count_limit):
    """The checked averages (fp32 NumPy arrays, tracked order) and count of `store`.

    Args:
        store: a dict-like written by `fill`.
        mine: the fingerprint of the object that loads it (`fingerprint`).
        variables: the tracked variables, for the name of a mismatched one.
        count_limit: the largest count the loading backend holds (JAX without x64: int32).

    Raises:
        ValueError: naming what differs, if the store does not match.
    """

    saved = stores.read_fingerprint(store, FORMAT, "AveragedWeights")
    if saved["rule"] != mine["rule"]:
        raise ValueError(
            f"The saved averages were made by the {saved['rule']!r} rule, this "
            f"AveragedWeights uses {mine['rule']!r}: `mode`, `avg_fn` and `multi_avg_fn` "
            f"must match. Received: rule={saved['rule']!r}"
        )
    if len(saved["shapes"]) != len(mine["shapes"]):
        raise ValueError(
            f"The saved averages are of {len(saved['shapes'])} variables, this "
            f"AveragedWeights tracks {len(mine['shapes'])}. "
            f"Received: {len(saved['shapes'])} saved averages"
        )
    values = []
    for i, (shape, variable) in enumerate(zip(mine["shapes"], variables)):
        value = stores.entry(store, str(i), "AveragedWeights")
        if list(value.shape) != shape or saved["shapes"][i] != shape:
            raise ValueError(
                f"Variable {i} ({model_variables.variable_name(variable)!r}) has shape "
                f"{tuple(shape)} but its saved average has shape {tuple(value.shape)}. "
                f"Received: saved shapes={saved['shapes']}"
            )
        values.append(value.astype(np.float32))
    return values, stores.read_count(store, "AveragedWeights", count_limit)
