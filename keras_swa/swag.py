"""`SWAG`: a Gaussian over the weights from the SWA captures, for Bayesian model averaging.

SWA-Gaussian (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning",
NeurIPS 2019, arXiv 1902.02476) fits a Gaussian to the weights SGD visits at the SWA captures: its
mean is the SWA average, its covariance the sum of a diagonal part (the variance of the captures)
and a low-rank part built from the last K deviations of the captures from their running mean.
Predicting with the average of the predictions of weights sampled from that Gaussian (Bayesian
model averaging) gives better-calibrated probabilities than the SWA model alone.

`SWAG` takes the same captures as `AveragedWeights` (`update()`) and shares its pieces: the
averaging math (`keras_swa.averaging`), the strategy handling (`keras_swa.distribution`), the
NaN/Inf policy (`keras_swa.finite_check`) and the writing of values into a model
(`keras_swa.model_variables`). One compiled call per capture updates the mean, the sum of
squared deviations (Welford's algorithm, so no `E[w^2] - E[w]^2` cancellation) and one column
of the deviation ring buffer. This module is the part every backend shares (arguments, the SWA
mean, the Gaussian's draws and `predict`); the statistics and their compiled calls belong to the
backend (`self._state`, one interface): `keras_swa.backends.tensorflow_swag.Statistics` (fp32
`tf.Variable`s, one XLA `tf.function` per device under `tf.distribute`; also tf_keras) or
`keras_swa.backends.jax_swag.Statistics` (`keras.Variable`s, one donated `jax.jit`). On
TensorFlow `SWAG` is a `tf.Module` holding the statistics under fixed attribute names, carried
by `tf.train.Checkpoint`; on JAX it is not, and `tf.train.Checkpoint` refuses it
(`keras_swa.backend.StateModule`). On every backend `save_weights` / `load_weights` (and Keras'
`save_own_variables` / `load_own_variables`) keep the whole state in a `.weights.h5` file
(`keras_swa.swag_store`).
"""

import numbers

import numpy as np

from keras_swa import (
    backend,
    distribution,
    ensemble,
    finite_check,
    model_variables,
    swag_store,
    weights_file,
)
from keras_swa.arguments import is_int
from keras_swa.backend import keras
from keras_swa.swap_context import swap_context

__all__ = ["SWAG"]

_NONFINITE = finite_check.POLICIES


class SWAG(backend.StateModule, weights_file.WeightsFileMethods):
    """SWA-Gaussian: a diagonal plus low-rank Gaussian over a model's weights.

    Call `update()` at the SWA captures (the end of each learning-rate cycle), exactly as for
    `AveragedWeights`. Each capture `w_i` (i = 1, 2, ...) updates, for every trainable variable:

    - the running mean `mean_i` (the SWA average; `assign_to()` and `swap()` write it into the
      model as for `AveragedWeights`),
    - the sum of squared deviations `M2_i = M2_{i-1} + (w_i - mean_{i-1}) * (w_i - mean_i)`
      (Welford), so that `variances()` is the population variance (ddof=0) of the captures,
    - the deviation column `w_i - mean_i` (from the running mean after the update, as in
      Algorithm 1 of the paper) in a ring buffer of the last `K = max_rank` columns.

    Memory: two fp32 copies of the trainable weights (mean and M2) plus `max_rank` fp32 columns,
    i.e. `(2 + max_rank)` times the number of trainable weights, in fp32.

    `sample()` writes one draw into the model; with `scale=0.5` (the default) it is the paper's
    `theta = mean + 1/sqrt(2) * sqrt(var) * z1 + 1/sqrt(2 (K - 1)) * D z2`, z1 and z2 standard
    normal. In general the draw is `mean + sqrt(scale) * (sqrt(var) * z1 + D z2 / sqrt(K - 1))`
    (`scale` multiplies the covariance, as in the authors' code), where `K` is the number of
    columns filled so far (`rank`). The covariance of the draws is
    `scale * (diag(var) + D D^T / (K - 1))`. BatchNorm statistics then have to be recomputed
    for the sampled weights (`keras_swa.update_bn`); `predict()` does all of it.

    Only trainable variables are modelled. Distribution (TensorFlow): like `AveragedWeights`,
    the statistics are mirrored variables under MirroredStrategy or MultiWorkerMirroredStrategy
    and `update()` runs per device; `sample()` draws once and assigns the draw to every replica.
    On JAX the statistics are `keras.Variable`s updated by one donated `jax.jit` call (single
    device), and draws use `jax.random` (`keras_swa.backends.jax_swag`): a seed gives the same
    draw every time on one backend, not the same draw on TensorFlow and JAX.

    Args:
        model: a built Keras model (or layer), or a list of trainable variables.
        max_rank: `K`, the number of deviation columns kept (the rank of the low-rank part).
            A positive int. Defaults to 20.
        nonfinite: what `update()` does with NaN/Inf weights, as for `AveragedWeights`:
            `"raise"` a `FloatingPointError`, `"skip"` the capture (with a warning), or
            `"ignore"` the check. A refused capture leaves every statistic as it was.
            Defaults to `"raise"`.
        seed: int seed for the draws made without an explicit `seed`. Defaults to `None`
            (different draws on every run).
        name: name of the module. Defaults to `"swag"`.

    Example:

    >>> import numpy as np
    >>> from keras_swa.backend import keras
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    >>> swag = SWAG(model, max_rank=5)
    >>> for step in range(4):     # in practice: at the end of each SWA cycle of training
    ...     _ = model.layers[0].kernel.assign(model.layers[0].kernel * 0.9 + 0.1 * step)
    ...     _ = swag.update()
    >>> swag.rank
    4
    >>> swag.sample(seed=0)       # one weight draw, now in the model
    >>> probs = swag.predict(np.ones((2, 3), "float32"), num_samples=3, seed=1)
    >>> probs.shape
    (2, 2)
    """

    def __init__(self, model, max_rank=20, nonfinite="raise", seed=None, name="swag"):
        backend.require_backend("SWAG")
        super().__init__(name=name)
        if not is_int(max_rank) or max_rank < 1:
            raise ValueError(
                f"`max_rank` must be a positive integer. Received: max_rank={max_rank!r}"
            )
        if seed is not None and not is_int(seed):
            raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(
                f"`nonfinite` must be one of {_NONFINITE}. Received: nonfinite={nonfinite!r}"
            )
        self._max_rank = int(max_rank)
        self._nonfinite = nonfinite
        self._rng = np.random.default_rng(seed)
        variables = model_variables.collect(model, include_non_trainable=False)
        # The model itself is kept for `predict`, untracked (not part of the checkpoint).
        self._source = model_variables.Untracked(
            variables=tuple(variables), model=model if isinstance(model, keras.Model) else None
        )
        self._state = self._make_state(model, variables)
        # The statistics, also as public attributes (the mean is `averages`).
        self.m2s, self.deviations = self._state.m2s, self._state.deviations

    def _make_state(self, model, variables):
        """The backend's statistics and their compiled update (`keras_swa.backends`)."""
        check = self._nonfinite != "ignore"
        if backend.backend_name() == "jax":
            from keras_swa.backends import jax_swag

            distribution.check_keras_distribution("keras_swa.SWAG")
            return jax_swag.Statistics(
                variables, self._max_rank, check=check, model=self._source.model
            )
        from keras_swa.backends import tensorflow_swag

        strategy = distribution.check_strategy(distribution.find_strategy(model), "SWAG")
        state = tensorflow_swag.Statistics(
            variables, self._max_rank, check=check, strategy=strategy,
            assert_finite=self._nonfinite == "raise",
        )
        # The checkpointed variables, held by this `tf.Module` under the keys SWAG checkpoints
        # have always had (the state object itself is not tracked; `m2s` and `deviations` are
        # set by the caller).
        self._own_averages = state.means
        self._count = state.count
        return state

    @property
    def _jax(self):
        """The JAX state (`keras_swa.backends.jax_swag.Statistics`), or `None` on TensorFlow."""
        return self._state if backend.backend_name() == "jax" else None

    # ------------------------------------------------------------------ the captures

    @property
    def tracked_variables(self):
        """The model variables whose statistics are kept (the trainable ones), in order."""
        return list(self._source.variables)

    @property
    def n_averaged(self):
        """The number of captures: an int64 `tf.Variable` on TensorFlow; on JAX an int32
        `keras.Variable` (int64 with `jax_enable_x64`), as for `AveragedWeights`."""
        return self._state.count

    @property
    def averages(self):
        """The mean of the captures, one fp32 tensor per tracked variable (a snapshot)."""
        return self._state.means_values()

    def update(self):
        """Folds the current weights into the mean, the M2 sums and the deviation ring buffer.

        One compiled call. On TensorFlow, under a `tf.distribute` strategy it runs once per
        device on that device's copies (from the cross-replica context or inside
        `strategy.run`).

        Returns:
            `True` if the capture was taken; `False` if a non-finite capture was skipped
            (`nonfinite="skip"`). Inside a `tf.function` the result is `None`: a non-finite
            capture fails a `tf.debugging.Assert` with `nonfinite="raise"`, and is left out
            with `nonfinite="skip"`.

        Raises:
            FloatingPointError: with `nonfinite="raise"`, if a weight is NaN or infinite; the
                statistics and `n_averaged` are left untouched.
        """
        ok = self._state.update()
        if ok is None or ok:  # `None`: inside a `tf.function`, whose graph checked the capture
            return ok
        return finite_check.refused(
            self._state, self._source.variables, self._nonfinite, "SWAG",
            poisoned="the SWAG statistics",
        )

    def reset(self):
        """Forgets every capture: mean, variance and deviation columns start afresh."""
        self._state.reset()

    # ------------------------------------------------------------------ the SWA mean

    def _require_captures(self):
        if int(self.n_averaged.numpy()) == 0:
            raise ValueError(
                "No weights have been averaged yet (n_averaged=0): call `update()` at least "
                "once before writing the averages into a model."
            )

    def _targets(self, model):
        model_variables.sync(self._source.model if model is None else model)
        if model is None:
            return list(self._source.variables)
        return model_variables.matching(model, self._source.variables, False, "averages")

    def assign_to(self, model=None):
        """Writes the SWA mean into the model, as `AveragedWeights.assign_to` does.

        Args:
            model: a model whose trainable variables match the tracked ones in number and
                shape. Defaults to the tracked variables themselves.
        """
        self._require_captures()
        model_variables.assign_values(self._targets(model), self.averages)

    @swap_context
    def swap(self, model=None):
        """Context manager: the SWA mean in the model inside, the original weights after.

        Called without `with` it changes nothing and warns, as `AveragedWeights.swap` does.

        Args:
            model: as for `assign_to`. Defaults to the tracked variables themselves.
        """
        self._require_captures()
        targets = self._targets(model)
        backup = model_variables.copy_values(targets)
        model_variables.assign_values(targets, self.averages)
        try:
            yield self
        finally:
            model_variables.assign_values(targets, backup)

    def save_own_variables(self, store):
        """Writes SWAG's whole state into a Keras-style store (`keras_swa.swag_store`).

        `store` is dict-like with string keys (Keras' own H5 store, or a plain `dict`). It gets
        `"mean_i"`, `"m2_i"` and `"deviations_i"` for tracked variable `i` (fp32: the mean, the
        Welford sum of squared deviations and the deviation ring buffer), `"n_averaged"` (int64)
        and `"fingerprint"` (`max_rank` and the tracked shapes), which `load_own_variables`
        checks. The same on every backend.

        Args:
            store: a dict-like, written with `store[key] = numpy_array`.
        """
        swag_store.fill(
            store, self._store_fingerprint(), self._state.arrays(), int(self.n_averaged.numpy())
        )

    def load_own_variables(self, store):
        """Restores SWAG's state saved by `save_own_variables`.

        Everything is read and checked before anything is written: a store saved from other
        variables or with another `max_rank` raises a `ValueError` that names the difference,
        and leaves this SWAG as it was.

        Args:
            store: a dict-like with the keys `save_own_variables` writes.
        """
        groups, count = swag_store.read(
            store, self._store_fingerprint(), self._source.variables, self._state.count_limit
        )
        self._state.restore(groups, count)

    def _store_fingerprint(self):
        return swag_store.fingerprint(self._max_rank, self._source.variables)

    # ------------------------------------------------------------------ the Gaussian

    @property
    def max_rank(self):
        """`K`, the number of deviation columns kept."""
        return self._max_rank

    @property
    def rank(self):
        """The number of deviation columns filled so far: `min(n_averaged, max_rank)`."""
        return min(int(self.n_averaged.numpy()), self._max_rank)

    def mean(self):
        """The mean of the captures (the SWA average), one fp32 tensor per tracked variable."""
        self._require_captures()
        return list(self.averages)

    def variances(self):
        """The diagonal variance (ddof=0) of the captures, one fp32 tensor per variable."""
        self._require_captures()
        return self._state.variances()

    def deviation_columns(self):
        """The low-rank factor `D`: the last `rank` columns `w_i - mean_i`, oldest first.

        Returns:
            One fp32 tensor per tracked variable, of shape `(rank,) + variable.shape`.
        """
        self._require_captures()
        n, k = int(self.n_averaged.numpy()), self.rank
        order = [(n - k + j) % self._max_rank for j in range(k)]
        return self._state.columns(order)

    def _check_sample_arguments(self, scale, diag, cov):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            0.0 <= scale < float("inf")
        ):
            raise ValueError(
                f"`scale` must be a non-negative finite number. Received: scale={scale!r}"
            )
        if not isinstance(diag, bool) or not isinstance(cov, bool):
            raise ValueError(
                f"`diag` and `cov` must be True or False. Received: diag={diag!r}, cov={cov!r}"
            )
        if not (diag or cov):
            raise ValueError(
                "At least one of `diag` and `cov` must be True (with neither, every draw is "
                "the mean: use `assign_to()` for the SWA model). "
                f"Received: diag={diag!r}, cov={cov!r}"
            )
        self._require_captures()
        if cov and self.rank < 2:
            raise ValueError(
                "The low-rank part needs at least 2 captures (it divides by rank - 1); call "
                "`update()` again or pass `cov=False`. "
                f"Received: cov=True with n_averaged={int(self.n_averaged.numpy())}"
            )

    def _seed(self, seed):
        if seed is None:
            return self._rng.integers(0, 2**31 - 1, size=2)
        if not is_int(seed):
            raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
        return np.array([seed, 0])

    def sample_vector(self, scale=0.5, diag=True, cov=True, seed=None):
        """Draws one weight sample without touching the model.

        Args:
            scale: non-negative factor of the covariance. Defaults to 0.5 (the paper's).
            diag: include the diagonal part. Defaults to `True`.
            cov: include the low-rank part (needs `rank >= 2`). Defaults to `True`.
            seed: int seed for this draw. Defaults to `None` (the next draw of the module's
                own generator).

        Returns:
            One fp32 tensor per tracked variable (`tracked_variables` order).
        """
        self._check_sample_arguments(scale, diag, cov)
        seed = self._seed(seed)
        if self._jax is not None:  # `jax.random.key` takes one int, TensorFlow's seed a pair
            seed = int(seed[0])
        return self._state.sample(float(scale), seed, diag, cov)

    def sample(self, scale=0.5, diag=True, cov=True, seed=None):
        """Writes one weight sample into the model (recompute BatchNorm statistics after).

        Args:
            scale: non-negative factor of the covariance. Defaults to 0.5 (the paper's).
            diag: include the diagonal part. Defaults to `True`.
            cov: include the low-rank part (needs `rank >= 2`). Defaults to `True`.
            seed: int seed for this draw. Defaults to `None`.
        """
        draw = self.sample_vector(scale, diag, cov, seed)
        model_variables.sync(self._source.model)
        model_variables.assign_values(list(self._source.variables), draw)

    def predict(
        self,
        x,
        num_samples=30,
        bn_data=None,
        scale=0.5,
        diag=True,
        cov=True,
        seed=None,
        batch_size=None,
        bn_batch_size=None,
        from_logits=False,
    ):
        """Bayesian model averaging: the mean of the predicted probabilities of S weight draws.

        For each of the `num_samples` draws: `sample()`, then `keras_swa.update_bn(bn_data)` if
        the model has BatchNormalization layers, then `model.predict(x)`. Every variable of the
        model (weights and BatchNorm statistics) is restored exactly afterwards, also on error.

        Args:
            x: inputs, anything `model.predict` accepts.
            num_samples: `S`, the number of weight draws, a positive int. Defaults to 30.
            bn_data: data for the BatchNorm pass of each draw (see `keras_swa.update_bn`);
                required when the model has BatchNormalization layers.
            scale: non-negative factor of the covariance. Defaults to 0.5.
            diag: include the diagonal part. Defaults to `True`.
            cov: include the low-rank part. Defaults to `True`.
            seed: int; draw `j` is `sample(seed=seeds[j])` with
                `seeds = numpy.random.default_rng(seed).integers(0, 2**31 - 1, size=num_samples)`.
                Defaults to `None` (the module's own generator).
            batch_size: batch size of `model.predict`. Defaults to `None`.
            bn_batch_size: batch size of array `bn_data`. Defaults to `None`.
            from_logits: the model outputs logits: apply a softmax (last axis) to each draw's
                output before averaging. Defaults to `False` (it outputs probabilities).

        Returns:
            The averaged probabilities, a NumPy array (a structure of them for multi-output
            models).
        """
        if not is_int(num_samples) or num_samples < 1:
            raise ValueError(
                f"`num_samples` must be a positive integer. Received: num_samples={num_samples!r}"
            )
        self._check_sample_arguments(scale, diag, cov)
        model = self._model()
        has_bn = bool(backend.batch_norm_layers(model))
        if has_bn and bn_data is None:
            raise ValueError(
                "The model has BatchNormalization layers, whose statistics must be recomputed "
                "for every weight draw: pass `bn_data` (usually the training inputs). "
                "Received: bn_data=None"
            )
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=num_samples)]
        return ensemble.average_probabilities(
            model,
            lambda j: self.sample(scale, diag, cov, seed=seeds[j]),
            num_samples,
            x,
            bn_data=bn_data if has_bn else None,
            batch_size=batch_size,
            bn_batch_size=bn_batch_size,
            from_logits=from_logits,
        )

    def _model(self):
        model = getattr(self._source, "model", None)
        if model is None:
            raise ValueError(
                "`predict` needs the model: create the SWAG from a Keras model, not from a "
                "list of variables."
            )
        return model
