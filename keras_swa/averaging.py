"""The averaging math: pure functions `(average, value, n) -> new_average`.

Stochastic Weight Averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018, arXiv 1803.05407) keeps the running equal-weight mean of the weights SGD
visits:

    average_{n+1} = average_n + (w - average_n) / (n + 1)

which is exact for any n (the first update, n = 0, copies `w`). The exponential moving average
(`average = decay * average + (1 - decay) * w`) is the other mode keras_swa offers; its first update
copies too, as Keras' optimizer EMA does. These functions are all the algorithm there is:
`rule` builds from them (or from the user's `avg_fn`) the one pure function that
`AveragedWeights` applies to every variable in one XLA-compiled call, on every backend
(`tf.function(jit_compile=True)` on TensorFlow, `jax.jit` on JAX: `keras_swa.backends`).

They are written on `keras_swa.backend.ops` (`keras.ops` with Keras 3, TensorFlow with
tf_keras), so that the one definition serves every backend.
"""

from keras_swa.backend import ops

__all__ = ["ema_decay", "ema_update", "rule", "swa_update", "welford_m2"]


def swa_update(average, value, n_averaged):
    """Folds `value` into an equal-weight running mean of `n_averaged` earlier values.

    Computed as the lerp `average + (value - average) * (1 / (n + 1))` with the weight a scalar,
    so the whole update is one fused, memory-bound elementwise loop. With `n_averaged == 0` the
    result is exactly `value` when `average` is 0 (`AveragedWeights` keeps unused averages at 0).

    Args:
        average: float tensor, the mean of the `n_averaged` values so far.
        value: tensor of the same shape; cast to `average`'s dtype before the update, so that
            bf16/fp16 weights are averaged in fp32.
        n_averaged: integer (or float) scalar tensor, how many values `average` holds.

    Returns:
        The new mean, of `average`'s dtype.

    Example:

    >>> import numpy as np
    >>> from keras_swa.backend import ops
    >>> avg = swa_update(ops.zeros([2]), ops.convert_to_tensor([1.0, 3.0]), 0)
    >>> avg = swa_update(avg, ops.convert_to_tensor([3.0, 5.0]), 1)
    >>> np.asarray(avg).tolist()
    [2.0, 4.0]
    """
    value = ops.cast(value, average.dtype)
    weight = 1.0 / (ops.cast(n_averaged, average.dtype) + 1.0)
    return average + (value - average) * weight


def ema_update(average, value, decay, n_averaged):
    """Folds `value` into an exponential moving average; the first update copies `value`.

    Computed as `average + (value - average) * (1 - d)` with `d = decay`, or `d = 0` for the
    first update (`n_averaged == 0`), which then gives exactly `value` when `average` is 0.

    Args:
        average: float tensor, the current moving average.
        value: tensor of the same shape, cast to `average`'s dtype.
        decay: float in [0, 1), the weight kept by the old average.
        n_averaged: integer scalar tensor, how many values were folded in so far.

    Returns:
        `decay * average + (1 - decay) * value`, or `value` for the first update.

    Example:

    >>> import numpy as np
    >>> from keras_swa.backend import ops
    >>> avg = ema_update(ops.zeros([1]), ops.convert_to_tensor([4.0]), 0.5, 0)
    >>> np.asarray(ema_update(avg, ops.convert_to_tensor([2.0]), 0.5, 1)).tolist()
    [3.0]
    """
    value = ops.cast(value, average.dtype)
    first = ops.cast(ops.equal(n_averaged, 0), average.dtype)
    keep = decay * (1.0 - first)
    return average + (value - average) * (1.0 - keep)


def ema_decay(decay, n_averaged, dynamic_decay=False, warmup_power=None, warmup_gamma=1.0):
    """The EMA decay of the update that follows `n_averaged` earlier ones, as a float32 scalar.

    - constant: `decay`;
    - `dynamic_decay=True` (tensorflow-addons' `MovingAverage(dynamic_decay=True)`, TF Model
      Garden's EMA): `min(decay, (1 + n) / (10 + n))`;
    - `warmup_power=p` (timm's EMA warm-up): `min(decay, 1 - (1 + n / warmup_gamma) ** -p)`.

    `n` is `n_averaged`, the number of updates before this one, so the first update (n = 0) has
    decay 0.1 (dynamic) or 0 (warm-up); `ema_update` copies the value on it either way. Computed
    from the tensor `n_averaged`, so that it lives inside the compiled update (no retracing).

    Args:
        decay: float in [0, 1), the largest decay.
        n_averaged: integer scalar tensor, how many values were folded in so far.
        dynamic_decay: use tfa's `(1 + n) / (10 + n)` warm-up. Defaults to `False`.
        warmup_power: the power `p` of timm's warm-up, or `None` for none. Defaults to `None`.
        warmup_gamma: timm's `gamma` (the warm-up's time scale in updates). Defaults to 1.0.

    Returns:
        The decay, a float32 scalar tensor.

    Example:

    >>> import numpy as np
    >>> [round(float(np.asarray(ema_decay(0.999, n, dynamic_decay=True))), 4) for n in (0, 1, 90)]
    [0.1, 0.1818, 0.91]
    """
    decay = ops.cast(decay, "float32")
    n = ops.cast(n_averaged, "float32")
    if dynamic_decay:
        return ops.minimum(decay, (1.0 + n) / (10.0 + n))
    if warmup_power is not None:
        return ops.minimum(decay, 1.0 - ops.power(1.0 + n / warmup_gamma, -float(warmup_power)))
    return decay


def welford_m2(m2, value, old_mean, new_mean, n_averaged):
    """Welford's update of the sum of squared deviations from the mean, for SWAG's variance.

    `M2 += (w - old_mean) * (w - new_mean)`, and 0 for the first value (`n_averaged == 0`), so
    `M2 / n` is the population variance of the `n` values without the cancellation of
    `E[w^2] - E[w]^2` (Welford 1962).

    Args:
        m2: float tensor, the sum so far over `n_averaged` values.
        value: the new value (same shape), already in `m2`'s dtype.
        old_mean: the mean of the `n_averaged` earlier values.
        new_mean: the mean including `value` (`swa_update(old_mean, value, n_averaged)`).
        n_averaged: integer scalar tensor, how many values `m2` holds.

    Returns:
        The new sum, of `m2`'s dtype.

    Example:

    >>> import numpy as np
    >>> from keras_swa.backend import ops
    >>> m2, mean = ops.zeros([1]), ops.zeros([1])
    >>> for n, w in enumerate([1.0, 2.0, 6.0]):
    ...     w = ops.convert_to_tensor([w])
    ...     new = swa_update(mean, w, n)
    ...     m2, mean = welford_m2(m2, w, mean, new, n), new
    >>> np.asarray(m2).tolist()   # 3 * np.var([1, 2, 6])
    [14.0]
    """
    first = ops.equal(n_averaged, 0)
    return ops.where(first, ops.zeros_like(m2), m2 + (value - old_mean) * (value - new_mean))


def rule(mode="swa", decay=None, dynamic_decay=False, warmup_power=None, warmup_gamma=1.0,
         avg_fn=None, multi_avg_fn=None):
    """The averaging rule of `AveragedWeights`: `(averages, values, n) -> new averages`.

    Pure, on lists of fp32 tensors, written on `keras_swa.backend.ops` and the user's
    functions: the backends compile it (`tf.function(jit_compile=True)`, `jax.jit`) with `n` a
    scalar tensor, so the decay of a dynamic EMA is computed inside the compiled update. The
    arguments are those of `AveragedWeights` (checked by `keras_swa.rule_arguments`); with
    `avg_fn` or `multi_avg_fn` the first update copies the weights, as torch's does.

    Example:

    >>> import numpy as np
    >>> update = rule("ema", decay=0.5)
    >>> zeros, ones = np.zeros(1, "float32"), np.ones(1, "float32")
    >>> [float(np.asarray(a)[0]) for a in update([zeros], [ones], 1)]
    [0.5]
    """
    def custom(averages, values, n):
        values = [ops.cast(v, "float32") for v in values]
        if multi_avg_fn is not None:
            new = multi_avg_fn(list(averages), list(values), n)
            name = "multi_avg_fn"
            if not isinstance(new, (list, tuple)) or len(new) != len(averages):
                raise ValueError(
                    f"`multi_avg_fn` must return a list of {len(averages)} tensors, one per "
                    f"average. Received: {type(new).__name__} {new!r:.200}"
                )
        else:
            new = [avg_fn(a, v, n) for a, v in zip(averages, values)]
            name = "avg_fn"
        out = []
        first = ops.equal(n, 0)
        for i, (average, value, result) in enumerate(zip(averages, values, new)):
            result = ops.cast(ops.convert_to_tensor(result), "float32")
            if tuple(result.shape) != tuple(average.shape):
                raise ValueError(
                    f"`{name}` must return averages of the averages' shapes: average {i} "
                    f"has shape {tuple(average.shape)}, `{name}` returned shape "
                    f"{tuple(result.shape)}."
                )
            # As torch's `AveragedModel`: the first update copies the weights.
            out.append(ops.where(first, value, result))
        return out

    def builtin(averages, values, n):
        if mode == "swa":
            return [swa_update(a, v, n) for a, v in zip(averages, values)]
        d = ema_decay(decay, n, dynamic_decay, warmup_power, warmup_gamma)
        return [ema_update(a, v, d, n) for a, v in zip(averages, values)]

    return custom if avg_fn is not None or multi_avg_fn is not None else builtin
