"""`AveragedWeights`: the averaging state of SWA, for `model.fit` and for custom training loops.

This is keras_swa's analogue of torch's `torch.optim.swa_utils.AveragedModel`: it holds one fp32
average per tracked variable and an integer `n_averaged`, and `update()` folds the current weights
into every average in ONE compiled call, behind a NaN/Inf check of the capture
(`keras_swa.finite_check`). This module is the part every backend shares: the arguments, the
averaging rule (SWA's mean, an EMA with an optional warm-up of its decay, or the user's
`avg_fn`; one pure function, `_rule`, on `keras_swa.averaging`), writing the averages into a
model (`assign_to`, `swap`), Keras-style saving and the report of a refused capture. The state
and its compiled update belong to the backend (`self._state`, one interface):
`keras_swa.backends.tensorflow.Averages` (`tf.Variable`s, one XLA `tf.function` per device under
`tf.distribute`, small averages packed into one buffer; also tf_keras) or
`keras_swa.backends.jax.Averages` (`keras.Variable`s, one donated `jax.jit`).

On TensorFlow `AveragedWeights` is a `tf.Module` holding the state's variables under fixed
attribute names, so `tf.train.Checkpoint(swa=averaged)` and `keras.callbacks.BackupAndRestore`
carry the averages and the count; on JAX it is not (`keras_swa.backend.StateModule`), and a
`tf.train.Checkpoint` refuses it. On every backend `save_weights` / `load_weights` (and Keras'
`save_own_variables` / `load_own_variables` store protocol) put them in a `.weights.h5` file
(`keras_swa.weights_file`).

Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018, arXiv 1803.05407.
"""

from keras_swa import (
    averages_store,
    averaging,
    backend,
    distribution,
    finite_check,
    model_variables,
    rule_arguments,
    weights_file,
)
from keras_swa.backend import keras
from keras_swa.swap_context import swap_context

__all__ = ["AveragedWeights"]


class AveragedWeights(backend.StateModule):
    """Running average of a model's weights, updated by one compiled call.

    Create it once the model is built, call `update()` whenever the current weights should be
    captured (SWA: at the end of each learning-rate cycle), then write the averages into the model
    with `assign_to()` or temporarily with the `swap()` context manager. In "swa" mode the average
    is the equal-weight mean of every capture (`avg += (w - avg) / (n + 1)`); in "ema" mode it is an
    exponential moving average with `decay`. Averages are fp32 whatever the variables' dtype.

    Non-trainable variables (BatchNorm moving statistics, counters) are not averaged by default:
    SWA recomputes BN statistics for the averaged weights with `keras_swa.update_bn` instead.

    Under a `tf.distribute` strategy (the one in scope, else the model's `distribute_strategy`)
    the averages are mirrored variables and `update()` runs the compiled update once per device
    on that device's copies, from the cross-replica context or inside `strategy.run`.
    MirroredStrategy and MultiWorkerMirroredStrategy are supported; ParameterServerStrategy is
    refused with a `ValueError`. On JAX, under `keras.distribution.DataParallel` the averages are
    replicated like the variables (`keras_swa.backends.jax`); other distributions are refused
    with a `NotImplementedError`.

    Args:
        model_or_variables: a built Keras model or layer, or a list of variables (Keras or
            `tf.Variable`s).
        mode: `"swa"` (equal-weight mean) or `"ema"` (exponential moving average).
            Defaults to `"swa"`.
        decay: the EMA decay in [0, 1); required for `mode="ema"`, not allowed otherwise.
        include_non_trainable: also average the non-trainable variables of a model.
            Defaults to `False`.
        nonfinite: what `update()` does when a weight is NaN or infinite (training diverged):
            `"raise"` a `FloatingPointError` naming the first bad variable, `"skip"` the capture
            (not counted, with a warning), or `"ignore"` the check (saves one read of the
            weights per update). The averages are never poisoned unless `"ignore"`.
            Defaults to `"raise"`.
        dynamic_decay: with `mode="ema"`, warm the decay up as tensorflow-addons'
            `MovingAverage(dynamic_decay=True)` and TF Model Garden's EMA do: the update after
            `n` earlier ones (`n = n_averaged` before it: 0 for the first) uses
            `min(decay, (1 + n) / (10 + n))`. Computed from the count inside the compiled
            update. Defaults to `False`.
        warmup_power: with `mode="ema"`, timm's warm-up instead: the decay is
            `min(decay, 1 - (1 + n / warmup_gamma) ** -warmup_power)`, same `n`. A positive
            float (timm suggests 2/3, or 3/4 for short runs), or `None` for no warm-up.
            Defaults to `None`.
        warmup_gamma: timm's `gamma`, the time scale of that warm-up in updates; only with
            `warmup_power`. Defaults to 1.0.
        avg_fn: a custom averaging rule, as torch's `AveragedModel(avg_fn=...)`:
            `avg_fn(average, value, n_averaged) -> new_average`, called per tracked variable
            with the fp32 average, the weight cast to fp32 and the count before this update as
            a scalar integer tensor (int64 on TensorFlow, int32 on JAX without x64). Write it
            with `keras.ops` (or TensorFlow ops on TensorFlow, `jax.numpy` on JAX): it is traced
            once into the one compiled update. It replaces the built-in rule, so `mode` must
            stay `"swa"` and `decay` `None`. As in torch, the first update copies the weights
            (`avg_fn` is used from the second). Averages of small variables are not packed
            into one flat buffer when a custom rule is given (it may not be elementwise): each
            variable has an average of its own. Defaults to `None`.
        multi_avg_fn: the list form, as torch's `multi_avg_fn`:
            `multi_avg_fn(averages, values, n_averaged) -> new_averages` on lists in the order
            of `tracked_variables` (it returns the new list; nothing is updated in place).
            Same rules as `avg_fn`, which it excludes. Defaults to `None`.
        name: name of the module. Defaults to `"averaged_weights"`.

    Example:

    >>> import tensorflow as tf
    >>> from keras_swa.backend import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> averaged = AveragedWeights(model)
    >>> averaged.update()             # first capture: a copy
    True
    >>> _ = model.layers[0].kernel.assign(model.layers[0].kernel + 2.0)
    >>> averaged.update()             # second capture: mean of the two
    True
    >>> int(averaged.n_averaged)
    2
    >>> with averaged.swap():         # averages in the model, originals back on exit
    ...     _ = model(tf.ones((1, 3)))
    >>> averaged.assign_to(model)     # or keep the averages in the model

    An EMA whose decay warms up (tensorflow-addons' `dynamic_decay`), and a custom rule:

    >>> ema = AveragedWeights(model, mode="ema", decay=0.999, dynamic_decay=True)
    >>> peak = AveragedWeights(model, avg_fn=lambda avg, w, n: tf.maximum(avg, w))
    """

    def __init__(
        self,
        model_or_variables,
        mode="swa",
        decay=None,
        include_non_trainable=False,
        nonfinite="raise",
        dynamic_decay=False,
        warmup_power=None,
        warmup_gamma=1.0,
        avg_fn=None,
        multi_avg_fn=None,
        name="averaged_weights",
    ):
        backend.require_backend("AveragedWeights")
        super().__init__(name=name)
        rule_arguments.check_rule(
            mode, decay, nonfinite, dynamic_decay, warmup_power, warmup_gamma, avg_fn,
            multi_avg_fn,
        )
        if decay is not None:
            decay = float(decay)
        self._nonfinite = nonfinite
        self._mode = mode
        self._decay = decay
        self._dynamic_decay = bool(dynamic_decay)
        self._warmup_power = None if warmup_power is None else float(warmup_power)
        self._warmup_gamma = float(warmup_gamma)
        self._avg_fn = avg_fn
        self._multi_avg_fn = multi_avg_fn
        self._include_non_trainable = bool(include_non_trainable)

        variables = model_variables.collect(model_or_variables, self._include_non_trainable)
        self._source = model_variables.Untracked(variables=tuple(variables))
        self._state = self._make_state(model_or_variables, variables)

    def _make_state(self, model_or_variables, variables):
        """The backend's averages and their compiled update (`keras_swa.backends`)."""
        check = self._nonfinite != "ignore"
        if backend.backend_name() == "jax":
            from keras_swa.backends import jax as jax_backend

            distribution.check_keras_distribution("keras_swa.AveragedWeights")
            model = model_or_variables if isinstance(model_or_variables, keras.Model) else None
            return jax_backend.Averages(
                variables,
                self._rule(),
                check=check,
                model=model,
                elementwise=not self._custom_rule,  # a user's rule gets one average per variable
            )
        from keras_swa.backends import tensorflow as tf_backend

        strategy = distribution.check_strategy(
            distribution.find_strategy(model_or_variables), "AveragedWeights"
        )
        state = tf_backend.Averages(
            variables,
            self._rule(),
            check=check,
            strategy=strategy,
            elementwise=not self._custom_rule,  # a user's rule may not be: nothing packed
            assert_finite=self._nonfinite == "raise",
        )
        # The checkpointed variables, held by this `tf.Module` under the attribute names its
        # checkpoints have always had (the state object itself is not tracked): an average
        # per large variable, one flat average of the small ones, and the count.
        self._own_averages = state.own_averages
        self._packed_averages = state.packed_averages
        self._count = state.count
        return state

    @property
    def _jax(self):
        """The JAX state (`keras_swa.backends.jax.Averages`), or `None` on TensorFlow."""
        return self._state if backend.backend_name() == "jax" else None

    # ------------------------------------------------------------------ set-up helpers

    @property
    def _custom_rule(self):
        return self._avg_fn is not None or self._multi_avg_fn is not None

    def _rule(self):
        """The averaging rule, `(averages, values, n) -> new averages` (`averaging.rule`)."""
        return averaging.rule(
            self._mode, self._decay, self._dynamic_decay, self._warmup_power,
            self._warmup_gamma, self._avg_fn, self._multi_avg_fn,
        )

    # ------------------------------------------------------------------ properties

    @property
    def mode(self):
        """`"swa"` or `"ema"`."""
        return self._mode

    @property
    def decay(self):
        """The EMA decay, or `None` in "swa" mode."""
        return self._decay

    @property
    def dynamic_decay(self):
        """Whether the EMA decay warms up as `min(decay, (1 + n) / (10 + n))`."""
        return self._dynamic_decay

    @property
    def tracked_variables(self):
        """The model variables whose averages are kept, in the order of `averages`."""
        return list(self._source.variables)

    @property
    def n_averaged(self):
        """The number of captures folded in: an int64 `tf.Variable` on TensorFlow; on JAX an
        int32 `keras.Variable` (int64 with `jax_enable_x64`, see `keras_swa.backends.jax`)."""
        return self._state.count

    @property
    def averages(self):
        """The current average of each tracked variable: fp32 tensors, in the order of
        `tracked_variables` (a snapshot; write them into a model with `assign_to` or `swap`)."""
        return self._state.values()

    # ------------------------------------------------------------------ the update

    def update(self):
        """Folds the current weights into every average (one compiled call) and counts it.

        Call it from a custom training loop whenever a capture is due, outside or inside a
        `tf.function`. Under a `tf.distribute` strategy it runs once per device on that device's
        copies (every replica holds identical, mirrored weights). The NaN/Inf check (unless
        `nonfinite="ignore"`, `keras_swa.finite_check`) runs first, in the same graph call, and
        a capture that fails it never reaches the compiled update.

        Returns:
            `True` if the weights were folded in; `False` if a non-finite capture was skipped
            (`nonfinite="skip"`). Inside a `tf.function` the check runs in the graph and the
            result is `None`.

        Raises:
            FloatingPointError: with `nonfinite="raise"`, if a weight is NaN or infinite; the
                averages and `n_averaged` are left untouched.
        """
        ok = self._state.update()
        if ok is None or ok:  # `None`: inside a `tf.function`, whose graph checked the capture
            return ok
        return finite_check.refused(
            self._state, self._source.variables, self._nonfinite, "AveragedWeights"
        )

    def reset(self):
        """Forgets every capture: the next `update()` starts a new average."""
        self._state.reset()

    # ------------------------------------------------------------------ writing back

    def _check_target(self, model):
        self._state.sync(model)
        if model is None:
            return list(self._source.variables)
        return model_variables.matching(
            model, self._source.variables, self._include_non_trainable, "averages"
        )

    def _require_captures(self):
        if int(self.n_averaged.numpy()) == 0:
            raise ValueError(
                "No weights have been averaged yet (n_averaged=0): call `update()` at least "
                "once before writing the averages into a model."
            )

    def assign_to(self, model=None):
        """Writes the averages into the model (cast once to each variable's dtype).

        Args:
            model: the model to write into; its (trainable, unless `include_non_trainable`)
                variables must match the averages in number and shape. Defaults to the
                variables the averages were created from.
        """
        self._require_captures()
        targets = self._check_target(model)
        self._state.write_averages(targets)

    @swap_context
    def swap(self, model=None):
        """Context manager: the averages are in the model inside, the original weights after.

        The original values are copied in their own dtype and restored exactly on exit, also
        when the body raises. Called without `with` it changes nothing and warns (a
        `RuntimeWarning`): unlike tensorflow-addons' `swap_weights()`, it swaps only for the
        block; `assign_to()` writes the averages for good.

        Args:
            model: as for `assign_to`. Defaults to the averaged variables themselves.
        """
        self._require_captures()
        targets = self._check_target(model)
        backup = self._state.keep(targets)
        self._state.write_averages(targets)
        try:
            yield self
        finally:
            self._state.put_back(targets, backup)

    # ------------------------------------------------------------------ Keras-style saving

    def _fingerprint(self):
        if self._multi_avg_fn is not None:
            rule = "multi_avg_fn"
        elif self._avg_fn is not None:
            rule = "avg_fn"
        else:
            rule = self._mode
        return averages_store.fingerprint(rule, self._source.variables)

    def _check_store_support(self, method):
        # The store holds the averages and the count; a subclass with more state
        # must save it too, and then set `_store_holds_all_state = True`, to use it.
        if type(self) is not AveragedWeights and not getattr(
            type(self), "_store_holds_all_state", False
        ):
            raise NotImplementedError(
                f"`{type(self).__name__}.{method}` would save only the averages of its state: "
                "use `tf.train.Checkpoint`, which saves all of it."
            )

    def save_own_variables(self, store):
        """Saves the averages and `n_averaged` into `store`, as Keras 3 layers do.

        `store` is dict-like with string keys (Keras' own H5 store, or a plain `dict`). It gets
        `"0"`, `"1"`, ... the fp32 average of each tracked variable, in the order of
        `tracked_variables`; `"n_averaged"`, the count (int64); and `"fingerprint"`, the
        averaging rule and the shapes of the tracked variables as UTF-8 JSON bytes, which
        `load_own_variables` checks (`keras_swa.averages_store`).

        Args:
            store: a dict-like, written with `store[key] = numpy_array`.
        """
        self._check_store_support("save_own_variables")
        self._state.sync()
        count = int(self.n_averaged.numpy())
        averages_store.fill(store, self._fingerprint(), self.averages, count)

    def load_own_variables(self, store):
        """Restores the averages and `n_averaged` saved by `save_own_variables`.

        Everything is read and checked before anything is written: a store saved from other
        variables (another count or shape), or by another averaging rule (`mode`, `avg_fn`),
        raises a `ValueError` that names the difference, and leaves this object as it was.

        Args:
            store: a dict-like with the keys `save_own_variables` writes.
        """
        self._check_store_support("load_own_variables")
        values, count = averages_store.read(
            store, self._fingerprint(), self._source.variables, self._state.count_limit
        )
        self._state.restore(values, count)

    def save_weights(self, filepath):
        """Saves the averages and `n_averaged` to a `.weights.h5` file (HDF5), atomically.

        The file holds what `save_own_variables` writes, one dataset per key. It is written
        under a temporary name in the same folder and then renamed over `filepath`, so an
        interrupted save never leaves a half-written file. Needs h5py (installed with Keras 3).

        Args:
            filepath: str or `os.PathLike`, ending in `.weights.h5`.

        Example:

        >>> import os, tempfile
        >>> from keras_swa.backend import keras
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> averaged = AveragedWeights(model)
        >>> _ = averaged.update()
        >>> path = os.path.join(tempfile.mkdtemp(), "swa.weights.h5")
        >>> averaged.save_weights(path)
        >>> restored = AveragedWeights(model)
        >>> restored.load_weights(path)
        >>> int(restored.n_averaged)
        1
        """
        store = {}
        self.save_own_variables(store)
        weights_file.write(filepath, store)

    def load_weights(self, filepath):
        """Restores the averages and `n_averaged` from a file written by `save_weights`.

        A file saved from other variables or by another averaging rule raises a `ValueError`
        naming the difference, and this object is left as it was (see `load_own_variables`).

        Args:
            filepath: str or `os.PathLike`, ending in `.weights.h5`.
        """
        self._check_store_support("load_weights")
        self.load_own_variables(weights_file.read(filepath))
