"""Step-based learning-rate schedules for Stochastic Weight Averaging.

Every schedule here is a `keras.optimizers.schedules.LearningRateSchedule`: pass it to an optimizer
as `learning_rate=` and the optimizer evaluates it at `optimizer.iterations`, the 0-based index of
the step about to be taken. All of them are pure tensor ops (no Python branching on tensors),
so they run eagerly, inside `tf.function` and inside `tf.function(jit_compile=True)`, and they
serialize to JSON primitives only. They are written on `keras.ops` (TensorFlow ops with tf_keras,
`keras_swa.backend.ops`), so the same schedules run inside a JAX train step too.

- `Cyclic`: the cyclic schedule of the SWA paper, a sawtooth that falls linearly from `swa_lr`
  to `swa_lr_min` within each cycle; weights are captured at the cycle ends
  (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
  UAI 2018, https://arxiv.org/abs/1803.05407, Section 3.1).
- `Constant`: a constant learning rate (the paper's constant SWA learning rate).
- `Anneal`: the closed form of torch's `torch.optim.swa_utils.SWALR`, which anneals from the
  optimizer's learning rate to `swa_lr` with a cosine or linear ramp and then stays there.
- `PaperSchedule`: the schedule of the paper's official code (github.com/timgaripov/swa,
  `train.py`): flat, linear decay to `swa_lr`, flat, then SWA (constant or cyclic).
- `Triangular`: Smith's cyclical learning rate ("Cyclical Learning Rates for Training Neural
  Networks", WACV 2017, https://arxiv.org/abs/1506.01186), a drop-in replacement for
  tensorflow-addons' `CyclicalLearningRate` family.
"""

import inspect
import math
import numbers
import operator

from keras_swa import backend
from keras_swa.backend import keras, ops

__all__ = [
    "Anneal",
    "Constant",
    "Cyclic",
    "PaperSchedule",
    "Triangular",
]


def _register(cls):
    """Registers `cls` for Keras serialization under the package name `keras_swa`."""
    saving = getattr(keras, "saving", None)
    register = getattr(saving, "register_keras_serializable", None)
    if register is None:  # older tf_keras
        register = keras.utils.register_keras_serializable
    return register(package="keras_swa")(cls)


# ----------------------------------------------------------------------------- validation


def _received(**kwargs):
    parts = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in kwargs.items()]
    return "Received: " + ", ".join(parts)


def _is_real(value):
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _positive_number(name, value):
    if not _is_real(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive number. {_received(**{name: value})}")
    return float(value)


def _non_negative_number(name, value):
    if not _is_real(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative number. {_received(**{name: value})}")
    return float(value)


def _integer(value):
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_integer(name, value):
    as_int = _integer(value)
    if as_int is None or as_int < 1:
        raise ValueError(f"`{name}` must be a positive integer. {_received(**{name: value})}")
    return as_int


def _non_negative_integer(name, value):
    as_int = _integer(value)
    if as_int is None or as_int < 0:
        raise ValueError(
            f"`{name}` must be a non-negative integer. {_received(**{name: value})}"
        )
    return as_int


def _at_most(low_name, low, high_name, high):
    if low > high:
        raise ValueError(
            f"`{low_name}` must be less than or equal to `{high_name}`. "
            f"{_received(**{low_name: low, high_name: high})}"
        )


def _int_step(step):
    """The step as an integer tensor (float steps, as some optimizers pass, are floored).

    int64, or int32 on JAX without `jax_enable_x64` (exact to 2**31 - 1 steps).
    """
    step = ops.convert_to_tensor(step)
    if backend.is_floating(step):
        step = ops.floor(step)
    return ops.cast(step, backend.index_dtype())


class _Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """Shared `from_config` that rejects keys `__init__` does not take; the backend check."""

    def __init__(self):
        backend.require_backend("schedules")
        super().__init__()

    @classmethod
    def from_config(cls, config):
        """Instantiates the schedule from its `get_config()` output.

        Args:
            config: A dict, the output of `get_config()`.

        Returns:
            A schedule of this class.

        Raises:
            ValueError: if `config` holds keys that the constructor does not take.
        """
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(
                f"Unrecognized keys in the config of {cls.__name__}: {unknown}. "
                f"Expected only keys from {sorted(allowed)}. Received: config={config}"
            )
        return cls(**config)


# ----------------------------------------------------------------------------- schedules


@_register
class Cyclic(_Schedule):
    """The cyclic learning-rate schedule of the SWA paper.

    Counting SWA steps from `start_step` as `i = step - start_step + 1` (so `i = 1, 2, ...`),
    the learning rate is

        lr(i) = (1 - t(i)) * swa_lr + t(i) * swa_lr_min,
        t(i) = (((i - 1) mod cycle_length) + 1) / cycle_length,

    which falls linearly within each cycle of `cycle_length` steps and reaches exactly
    `swa_lr_min` at its last step (`i = cycle_length, 2 * cycle_length, ...`): those are the
    steps after which SWA captures the weights (Izmailov et al. 2018, Section 3.1). Before
    `start_step` the learning rate is `swa_lr`; `cycle_length=1` gives a constant `swa_lr_min`.

    Args:
        swa_lr: The largest learning rate of a cycle (the paper's `alpha_1`).
        swa_lr_min: The learning rate at the end of each cycle (the paper's `alpha_2`); at most
            `swa_lr`.
        cycle_length: Steps per cycle (the paper's `c`), a positive integer.
        start_step: The optimizer step at which the first cycle begins. Defaults to `0`.

    Example:

    >>> schedule = Cyclic(swa_lr=0.05, swa_lr_min=0.01, cycle_length=4)
    >>> [round(float(schedule(step)), 4) for step in range(6)]
    [0.04, 0.03, 0.02, 0.01, 0.04, 0.03]
    >>> [schedule.is_cycle_end(step) for step in range(6)]
    [False, False, False, True, False, False]
    """

    def __init__(self, swa_lr, swa_lr_min, cycle_length, start_step=0):
        super().__init__()
        self.swa_lr = _positive_number("swa_lr", swa_lr)
        self.swa_lr_min = _non_negative_number("swa_lr_min", swa_lr_min)
        _at_most("swa_lr_min", swa_lr_min, "swa_lr", swa_lr)
        self.cycle_length = _positive_integer("cycle_length", cycle_length)
        self.start_step = _non_negative_integer("start_step", start_step)

    def __call__(self, step):
        i = _int_step(step) - self.start_step + 1
        position = ops.mod(i - 1, self.cycle_length) + 1
        t = ops.cast(position, "float32") / ops.convert_to_tensor(self.cycle_length, "float32")
        a1 = ops.convert_to_tensor(self.swa_lr, "float32")
        a2 = ops.convert_to_tensor(self.swa_lr_min, "float32")
        lr = (1.0 - t) * a1 + t * a2
        return ops.where(i >= 1, lr, a1)

    def is_cycle_end(self, step):
        """Whether the step with index `step` is the last step of a cycle.

        That step runs at exactly `swa_lr_min`; once it is done (when the optimizer's
        `iterations` equals `step + 1`) the weights are at a capture point.

        Args:
            step: The 0-based index of the step, a Python integer.

        Returns:
            A Python bool.
        """
        as_int = _integer(step)
        if as_int is None:
            raise TypeError(f"`step` must be an integer. Received: step={step!r}")
        i = as_int - self.start_step + 1
        return i >= 1 and i % self.cycle_length == 0

    def get_config(self):
        return {
            "swa_lr": self.swa_lr,
            "swa_lr_min": self.swa_lr_min,
            "cycle_length": self.cycle_length,
            "start_step": self.start_step,
        }


@_register
class Constant(_Schedule):
    """A constant learning rate.

    The SWA paper's constant schedule: after the SWA start the learning rate stays at
    `swa_lr`. Useful where an API expects a schedule object.

    Args:
        learning_rate: The learning rate, a positive number.

    Example:

    >>> schedule = Constant(0.05)
    >>> round(float(schedule(1000)), 4)
    0.05
    """

    def __init__(self, learning_rate):
        super().__init__()
        self.learning_rate = _positive_number("learning_rate", learning_rate)

    def __call__(self, step):
        del step  # unused
        return ops.convert_to_tensor(self.learning_rate, "float32")

    def get_config(self):
        return {"learning_rate": self.learning_rate}


@_register
class Anneal(_Schedule):
    """Anneals the learning rate to `swa_lr`, then holds it: torch's `SWALR` in closed form.

    Before `start_step` the learning rate is `initial_learning_rate`. At step
    `s >= start_step`, with `t = min(1, (s - start_step + 1) / anneal_steps)`,

        alpha = (1 - cos(pi * t)) / 2   ("cos")   or   alpha = t   ("linear"),
        lr = swa_lr * alpha + initial_learning_rate * (1 - alpha),

    so the learning rate reaches `swa_lr` at step `start_step + anneal_steps - 1` and stays there
    (`torch.optim.swa_utils.SWALR` with `anneal_epochs=anneal_steps`, counted in steps).

    Args:
        initial_learning_rate: The learning rate before the annealing, a positive number.
        swa_lr: The learning rate after the annealing, a positive number.
        anneal_steps: The number of steps the annealing takes, a positive integer.
        start_step: The step at which the annealing begins. Defaults to `0`.
        strategy: `"cos"` or `"linear"`. Defaults to `"cos"`.

    Example:

    >>> schedule = Anneal(0.1, swa_lr=0.05, anneal_steps=2, start_step=1, strategy="linear")
    >>> [round(float(schedule(step)), 4) for step in range(4)]
    [0.1, 0.075, 0.05, 0.05]
    """

    def __init__(
        self, initial_learning_rate, swa_lr, anneal_steps, start_step=0, strategy="cos"
    ):
        super().__init__()
        self.initial_learning_rate = _positive_number(
            "initial_learning_rate", initial_learning_rate
        )
        self.swa_lr = _positive_number("swa_lr", swa_lr)
        self.anneal_steps = _positive_integer("anneal_steps", anneal_steps)
        self.start_step = _non_negative_integer("start_step", start_step)
        if strategy not in ("cos", "linear"):
            raise ValueError(
                "`strategy` must be one of 'cos', 'linear'. " + _received(strategy=strategy)
            )
        self.strategy = strategy

    def __call__(self, step):
        n = _int_step(step) - self.start_step + 1
        n = ops.clip(n, 0, self.anneal_steps)
        t = ops.cast(n, "float32") / ops.convert_to_tensor(self.anneal_steps, "float32")
        if self.strategy == "cos":
            alpha = (1.0 - ops.cos(math.pi * t)) / 2.0
        else:
            alpha = t
        initial = ops.convert_to_tensor(self.initial_learning_rate, "float32")
        swa_lr = ops.convert_to_tensor(self.swa_lr, "float32")
        lr = swa_lr * alpha + initial * (1.0 - alpha)
        lr = ops.where(n >= self.anneal_steps, swa_lr, lr)  # exactly `swa_lr` once annealed
        return ops.where(n <= 0, initial, lr)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "swa_lr": self.swa_lr,
            "anneal_steps": self.anneal_steps,
            "start_step": self.start_step,
            "strategy": self.strategy,
        }


@_register
class PaperSchedule(_Schedule):
    """The learning-rate schedule of the SWA paper's official code.

    Before `swa_start`, with `t = step / swa_start` and `r = swa_lr / initial_learning_rate`,
    the learning rate is `initial_learning_rate * factor` where `factor` is `1` for `t <= 0.5`,
    falls linearly from `1` to `r` for `0.5 < t <= 0.9`, and is `r` after that
    (`schedule()` in github.com/timgaripov/swa `train.py`). From `swa_start` on it is the
    constant `swa_lr` or, when `swa_lr_min` is given, the `Cyclic` schedule
    `Cyclic(swa_lr, swa_lr_min, cycle_length, start_step=swa_start)`.

    The paper's SGD baseline is `PaperSchedule(lr, 0.01 * lr, swa_start=total_steps)`.

    Args:
        initial_learning_rate: The learning rate of the first half, a positive number.
        swa_lr: The learning rate reached at `t = 0.9` and used for SWA, a positive number.
        swa_start: The step at which SWA begins, a positive integer.
        swa_lr_min: If given, SWA uses a cyclic schedule from `swa_lr` down to `swa_lr_min`
            (at most `swa_lr`). Defaults to `None` (constant `swa_lr`).
        cycle_length: Steps per cycle of the cyclic SWA schedule; only with `swa_lr_min`.
            Defaults to `1`.

    Example:

    >>> schedule = PaperSchedule(0.1, swa_lr=0.02, swa_start=10)
    >>> [round(float(schedule(step)), 4) for step in (0, 5, 7, 9, 10, 100)]
    [0.1, 0.1, 0.06, 0.02, 0.02, 0.02]
    """

    def __init__(
        self, initial_learning_rate, swa_lr, swa_start, swa_lr_min=None, cycle_length=1
    ):
        super().__init__()
        self.initial_learning_rate = _positive_number(
            "initial_learning_rate", initial_learning_rate
        )
        self.swa_lr = _positive_number("swa_lr", swa_lr)
        self.swa_start = _positive_integer("swa_start", swa_start)
        self.cycle_length = _positive_integer("cycle_length", cycle_length)
        if swa_lr_min is None:
            if self.cycle_length != 1:
                raise ValueError(
                    "`cycle_length` is used only with `swa_lr_min`: pass `swa_lr_min` for a "
                    "cyclic SWA schedule, or leave `cycle_length=1`. "
                    + _received(cycle_length=cycle_length, swa_lr_min=swa_lr_min)
                )
            self.swa_lr_min = None
            self._swa = Constant(self.swa_lr)
        else:
            self.swa_lr_min = _non_negative_number("swa_lr_min", swa_lr_min)
            _at_most("swa_lr_min", swa_lr_min, "swa_lr", swa_lr)
            self._swa = Cyclic(
                self.swa_lr, self.swa_lr_min, self.cycle_length, start_step=self.swa_start
            )

    def __call__(self, step):
        step = _int_step(step)
        t = ops.cast(step, "float32") / ops.convert_to_tensor(self.swa_start, "float32")
        initial = ops.convert_to_tensor(self.initial_learning_rate, "float32")
        swa_lr = ops.convert_to_tensor(self.swa_lr, "float32")
        decaying = initial - (initial - swa_lr) * (t - 0.5) / 0.4
        lr = ops.where(t <= 0.5, initial, ops.where(t <= 0.9, decaying, swa_lr))
        return ops.where(step >= self.swa_start, self._swa(step), lr)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "swa_lr": self.swa_lr,
            "swa_start": self.swa_start,
            "swa_lr_min": self.swa_lr_min,
            "cycle_length": self.cycle_length,
        }


_TRIANGULAR_MODES = ("triangular", "triangular2", "exp_range")


@_register
class Triangular(_Schedule):
    """Smith's cyclical learning rate (triangular, triangular2 and exp_range policies).

    With `cycle = floor(1 + step / (2 * step_size))` and
    `x = abs(step / step_size - 2 * cycle + 1)`, the learning rate is

        lr = initial_learning_rate
             + (maximal_learning_rate - initial_learning_rate) * max(0, 1 - x) * scale,

    where `scale` is `1` for `"triangular"`, `1 / 2 ** (cycle - 1)` for `"triangular2"` and
    `gamma ** step` for `"exp_range"` (Smith, arXiv 1506.01186). It computes the same values as
    tensorflow-addons' `TriangularCyclicalLearningRate`, `Triangular2CyclicalLearningRate` and
    `ExponentialCyclicalLearningRate`, but its config holds no callables.

    Args:
        initial_learning_rate: The lower bound of each cycle, a non-negative number.
        maximal_learning_rate: The upper bound of each cycle, at least `initial_learning_rate`.
        step_size: Steps per half cycle, a positive number.
        mode: `"triangular"`, `"triangular2"` or `"exp_range"`. Defaults to `"triangular"`.
        gamma: The per-step decay of `"exp_range"`, a positive number; other modes need
            `gamma=1.0`. Defaults to `1.0`.

    Example:

    >>> schedule = Triangular(0.01, 0.05, step_size=2, mode="triangular2")
    >>> [round(float(schedule(step)), 4) for step in range(7)]
    [0.01, 0.03, 0.05, 0.03, 0.01, 0.02, 0.03]
    """

    def __init__(
        self,
        initial_learning_rate,
        maximal_learning_rate,
        step_size,
        mode="triangular",
        gamma=1.0,
    ):
        super().__init__()
        self.initial_learning_rate = _non_negative_number(
            "initial_learning_rate", initial_learning_rate
        )
        self.maximal_learning_rate = _positive_number(
            "maximal_learning_rate", maximal_learning_rate
        )
        _at_most(
            "initial_learning_rate",
            initial_learning_rate,
            "maximal_learning_rate",
            maximal_learning_rate,
        )
        step_size = _positive_number("step_size", step_size)
        self.step_size = int(step_size) if step_size.is_integer() else step_size
        if mode not in _TRIANGULAR_MODES:
            raise ValueError(
                f"`mode` must be one of {', '.join(map(repr, _TRIANGULAR_MODES))}. "
                + _received(mode=mode)
            )
        self.mode = mode
        self.gamma = _positive_number("gamma", gamma)
        if mode != "exp_range" and self.gamma != 1.0:
            raise ValueError(
                "`gamma` is used only with `mode='exp_range'`. "
                + _received(gamma=gamma, mode=mode)
            )

    def __call__(self, step):
        step = ops.cast(ops.convert_to_tensor(step), "float32")
        step_size = ops.convert_to_tensor(self.step_size, "float32")
        initial = ops.convert_to_tensor(self.initial_learning_rate, "float32")
        maximal = ops.convert_to_tensor(self.maximal_learning_rate, "float32")
        cycle = ops.floor(1.0 + step / (2.0 * step_size))
        x = ops.abs(step / step_size - 2.0 * cycle + 1.0)
        if self.mode == "triangular":
            scale = ops.convert_to_tensor(1.0, "float32")
        elif self.mode == "triangular2":
            scale = 1.0 / ops.power(2.0, cycle - 1.0)
        else:
            scale = ops.power(ops.convert_to_tensor(self.gamma, "float32"), step)
        return initial + (maximal - initial) * ops.maximum(0.0, 1.0 - x) * scale

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "maximal_learning_rate": self.maximal_learning_rate,
            "step_size": self.step_size,
            "mode": self.mode,
            "gamma": self.gamma,
        }
