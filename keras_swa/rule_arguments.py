"""The checks of the arguments that choose an averaging rule, shared by every entry point.

`AveragedWeights` validates them when it is created; the `SWA` callback creates its
`AveragedWeights` only at train begin, once the model is known, and validates the same arguments
with the same function when it is created, so a bad combination fails before training starts.
"""

from keras_swa.finite_check import POLICIES

__all__ = ["MODES", "check_rule"]

MODES = ("swa", "ema")


def _is_positive_real(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def check_rule(
    mode,
    decay,
    nonfinite="raise",
    dynamic_decay=False,
    warmup_power=None,
    warmup_gamma=1.0,
    avg_fn=None,
    multi_avg_fn=None,
):
    """Raises a `ValueError` naming the first invalid argument or combination.

    Args:
        mode: `"swa"` or `"ema"`.
        decay: the EMA decay in [0, 1) with `mode="ema"`, else `None`.
        nonfinite: `"raise"`, `"skip"` or `"ignore"`.
        dynamic_decay: bool, tensorflow-addons' EMA warm-up (`mode="ema"` only).
        warmup_power: positive float or `None`, timm's EMA warm-up (`mode="ema"` only).
        warmup_gamma: positive float, timm's warm-up scale (with `warmup_power` only).
        avg_fn: a callable or `None`, torch's per-variable averaging function.
        multi_avg_fn: a callable or `None`, torch's all-variables averaging function.

    Example:

    >>> check_rule("ema", 0.99, dynamic_decay=True)   # valid: returns None
    >>> try:
    ...     check_rule("swa", 0.9)
    ... except ValueError as e:
    ...     print(str(e).split(". ")[-1])
    Received: mode='swa', decay=0.9
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    if mode == "ema" and (
        decay is None or isinstance(decay, bool) or not 0.0 <= float(decay) < 1.0
    ):
        raise ValueError(
            f"`decay` must be a float in [0, 1) when `mode='ema'`. Received: decay={decay!r}"
        )
    if mode != "ema" and decay is not None:
        raise ValueError(
            "`decay` is only used with `mode='ema'`; equal-weight SWA has no decay. "
            f"Received: mode={mode!r}, decay={decay!r}"
        )
    if nonfinite not in POLICIES:
        raise ValueError(
            f"`nonfinite` must be one of {POLICIES}. Received: nonfinite={nonfinite!r}"
        )
    if not isinstance(dynamic_decay, bool):
        raise ValueError(
            f"`dynamic_decay` must be a bool. Received: dynamic_decay={dynamic_decay!r}"
        )
    if warmup_power is not None and not _is_positive_real(warmup_power):
        raise ValueError(
            "`warmup_power` must be a positive float or None. "
            f"Received: warmup_power={warmup_power!r}"
        )
    if not _is_positive_real(warmup_gamma):
        raise ValueError(
            f"`warmup_gamma` must be a positive float. Received: warmup_gamma={warmup_gamma!r}"
        )
    if warmup_gamma != 1.0 and warmup_power is None:
        raise ValueError(
            "`warmup_gamma` is only used with `warmup_power`. "
            f"Received: warmup_gamma={warmup_gamma!r}, warmup_power=None"
        )
    if (dynamic_decay or warmup_power is not None) and mode != "ema":
        raise ValueError(
            "`dynamic_decay` and `warmup_power` only apply to `mode='ema'`. "
            f"Received: mode={mode!r}, dynamic_decay={dynamic_decay!r}, "
            f"warmup_power={warmup_power!r}"
        )
    if dynamic_decay and warmup_power is not None:
        raise ValueError(
            "Pass either `dynamic_decay=True` (tensorflow-addons' warm-up) or "
            "`warmup_power` (timm's), not both. "
            f"Received: dynamic_decay=True, warmup_power={warmup_power!r}"
        )
    for arg, fn in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{arg}` must be a callable or None. Received: {arg}={fn!r}")
    if avg_fn is not None and multi_avg_fn is not None:
        raise ValueError(
            "Pass either `avg_fn` or `multi_avg_fn`, not both. "
            f"Received: avg_fn={avg_fn!r}, multi_avg_fn={multi_avg_fn!r}"
        )
    if (avg_fn is not None or multi_avg_fn is not None) and (mode != "swa" or decay is not None):
        raise ValueError(
            "A custom `avg_fn`/`multi_avg_fn` replaces the built-in averaging rule: leave "
            "`mode='swa'` and `decay=None`. "
            f"Received: mode={mode!r}, decay={decay!r}"
        )
