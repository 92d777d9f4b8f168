"""What `FGE.save_own_variables` puts in a Keras-style store, and the checks on load.

A store is dict-like with string keys and NumPy values (Keras' own H5 store, a plain `dict`, or
the `.weights.h5` file of `keras_swa.weights_file`). It holds `"member_m_i"`, weight `i` (in the
order of `model.weights`, in its own dtype) of member `m` (oldest first), and `"fingerprint"`,
the number of members and the weights' shapes and dtypes as UTF-8 JSON bytes. On load everything
is read and checked before anything is written, so a store from another model raises a
`ValueError` naming the difference and changes nothing. The same on every backend.
"""

import numpy as np

from keras_swa import model_variables, stores

__all__ = ["FORMAT", "fill", "fingerprint", "read"]

FORMAT = "keras_swa.FGE"


def fingerprint(weights, members):
    """What a store must match: the weights' shapes and dtypes; and how many members it holds.

    Example:

    >>> import numpy as np
    >>> fingerprint([np.zeros((2, 3), "float32")], 4)
    {'format': 'keras_swa.FGE', 'shapes': [[2, 3]], 'dtypes': ['float32'], 'members': 4}
    """
    shapes = [[int(d) for d in w.shape] for w in weights]
    dtypes = [np.dtype(_dtype_name(w)).name for w in weights]
    return {"format": FORMAT, "shapes": shapes, "dtypes": dtypes, "members": int(members)}


def _dtype_name(weight):
    dtype = weight.dtype
    return getattr(dtype, "name", dtype)


def fill(store, mine, members):
    """Writes the fingerprint `mine` and each member's weights (NumPy) into `store`."""
    stores.write_fingerprint(store, mine)
    for m, member in enumerate(members):
        for i, value in enumerate(member):
            store[f"member_{m}_{i}"] = np.asarray(value)


def read(store, mine, weights, max_members):
    """The checked members of `store`: a list (oldest first) of lists of NumPy arrays.

    Args:
        store: a dict-like written by `fill`.
        mine: the fingerprint of the FGE that loads it (`fingerprint`; its member count is
            ignored).
        weights: the model's weights, for the name of a mismatched one.
        max_members: the loading FGE's `max_members` (`None`: no limit).

    Raises:
        ValueError: naming what differs, if the store does not match.
    """

    saved = stores.read_fingerprint(store, FORMAT, "FGE")
    if saved["shapes"] != mine["shapes"] or saved["dtypes"] != mine["dtypes"]:
        raise ValueError(
            f"The store holds members of weights of shapes {saved['shapes']} and dtypes "
            f"{saved['dtypes']}, this FGE's model has {mine['shapes']} and {mine['dtypes']}. "
            f"Received: saved shapes={saved['shapes']}"
        )
    count = saved["members"]
    if max_members is not None and count > max_members:
        raise ValueError(
            f"The store holds {count} members, more than this FGE's max_members={max_members}. "
            f"Received: {count} saved members"
        )
    members = []
    for m in range(count):
        member = []
        for i, (shape, dtype, weight) in enumerate(zip(mine["shapes"], mine["dtypes"], weights)):
            value = stores.entry(store, f"member_{m}_{i}", "FGE")
            if list(value.shape) != shape or value.dtype != np.dtype(dtype):
                raise ValueError(
                    f"Member {m}'s weight {i} ({model_variables.variable_name(weight)!r}) is "
                    f"saved with shape {tuple(value.shape)} and dtype {value.dtype}, not "
                    f"{tuple(shape)} and {dtype}. Received: member_{m}_{i}"
                )
            member.append(value)
        members.append(member)
    return members
