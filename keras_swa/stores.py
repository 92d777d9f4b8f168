"""What every keras_swa store shares: the fingerprint entry, checked reads, the count.

`AveragedWeights`, `SWAG` and `FGE` save their state into a Keras-style store (dict-like, string
keys, NumPy values; `keras_swa.averages_store`, `keras_swa.swag_store`, `keras_swa.fge_store`).
Each store carries a `"fingerprint"`: UTF-8 JSON bytes naming its format and what it was saved
from, read back first on load so that a store of another kind or from other variables is
refused, naming the difference, before anything is written.
"""

import json

import numpy as np

__all__ = ["entry", "read_count", "read_fingerprint", "write_count", "write_fingerprint"]


def write_fingerprint(store, fingerprint):
    """Writes the JSON-able dict `fingerprint` (with a `"format"` key) into `store`."""
    store["fingerprint"] = np.frombuffer(json.dumps(fingerprint).encode("utf-8"), np.uint8)


def write_count(store, count):
    """Writes the count into `store` as `"n_averaged"` (int64), as `read_count` reads it."""
    store["n_averaged"] = np.asarray(count, np.int64)


def entry(store, key, owner):
    """`store[key]` as a NumPy array; a `ValueError` naming `owner` if it is missing.

    Example:

    >>> entry({"n_averaged": 3}, "n_averaged", "SWAG")
    array(3)
    """
    try:
        return np.asarray(store[key])
    except KeyError:
        raise ValueError(
            f"The store holds no {key!r} entry: it was not saved by "
            f"`{owner}.save_own_variables`."
        ) from None


def read_fingerprint(store, format, owner):
    """The fingerprint of `store` (a dict), checked to be of `format`.

    Args:
        store: a dict-like with a `"fingerprint"` entry (`write_fingerprint`).
        format: the format the loading class writes, e.g. `"keras_swa.SWAG"`.
        owner: the loading class's name, for the messages.

    Raises:
        ValueError: if the entry is missing, unreadable or of another format.
    """
    try:
        saved = json.loads(entry(store, "fingerprint", owner).astype(np.uint8).tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("The store's 'fingerprint' entry is not readable.") from None
    if not isinstance(saved, dict) or saved.get("format") != format:
        got = saved.get("format") if isinstance(saved, dict) else None
        raise ValueError(
            f"The store was not saved by `{owner}.save_own_variables`. Received: format={got!r}"
        )
    return saved


def read_count(store, owner, count_limit):
    """The store's `"n_averaged"`, checked to be an integer in `[0, count_limit]`."""
    count = entry(store, "n_averaged", owner)
    if count.shape != () or not np.issubdtype(count.dtype, np.integer) or not (
        0 <= int(count) <= count_limit
    ):
        raise ValueError(
            f"`n_averaged` must be an integer in [0, {count_limit}]. "
            f"Received: n_averaged={count!r}"
        )
    return int(count)
