"""`swap()` context managers that say so when they are called without `with`.

`AveragedWeights.swap()` and `SWAG.swap()` put the averages into the model inside a `with` block
and the original weights back after it. tensorflow-addons' `MovingAverage.swap_weights()`, which
keras_swa replaces, swapped the weights when called; a user coming from it may write
`averaged.swap()` on its own line, and a plain generator context manager would then do nothing,
silently. `swap_context` makes such a call warn, naming what to write instead.
"""

import contextlib
import functools
import warnings

__all__ = ["swap_context"]


class _SwapContext:
    """A context manager that warns if it is dropped without having been entered."""

    def __init__(self, manager, name):
        self._manager = manager
        self._name = name
        self._entered = False

    def __enter__(self):
        self._entered = True
        return self._manager.__enter__()

    def __exit__(self, *exc_info):
        return self._manager.__exit__(*exc_info)

    def __del__(self):
        if not self._entered:
            warnings.warn(
                f"`{self._name}()` swapped nothing: it is a context manager, and the model's "
                f"weights change only inside `with {self._name}(): ...`. To write the averages "
                "into the model for good, call `assign_to()`.",
                RuntimeWarning,
                stacklevel=2,
            )


def swap_context(method):
    """Like `contextlib.contextmanager`, for a method; a call never entered warns.

    Example:

    >>> import warnings
    >>> class Holder:
    ...     @swap_context
    ...     def swap(self):
    ...         yield self
    >>> holder = Holder()
    >>> with holder.swap() as inside:
    ...     inside is holder
    True
    >>> def forgot():
    ...     holder.swap()  # without `with`: nothing happens, and it says so
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     forgot()
    >>> "swapped nothing" in str(caught[-1].message)
    True
    """
    manager = contextlib.contextmanager(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        name = f"{type(self).__name__}.{method.__name__}"
        return _SwapContext(manager(self, *args, **kwargs), name)

    return wrapper
