"""`SWAG`: a Gaussian over the weights from the SWA captures, for Bayesian model averaging.

SWA-Gaussian (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning",
NeurIPS 2019, arXiv 1902.02476) fits a Gaussian to the weights SGD visits at the SWA captures: its
mean is the SWA average, its covariance the sum of a diagonal part (the variance of the captures)
and a low-rank part built from the last K deviations of the captures from their running mean.
Predicting with the average of the predictions of weights sampled from that Gaussian (Bayesian
model averaging) gives better-calibrated probabilities than the SWA model alone.

`SWAG` extends `AveragedWeights`: the same captures (`update()`), the same mean, the same
strategy handling and non-finite checks, and every statistic in fp32 variables of one `tf.Module`
that `tf.train.Checkpoint` carries. One XLA-compiled call per capture updates the mean, the
sum of squared deviations (Welford's algorithm, so no `E[w^2] - E[w]^2` cancellation) and one
column of the deviation ring buffer.
"""

import contextlib
import numbers

import numpy as np
import tensorflow as tf

from keras_swa import averaging, backend
from keras_swa.averaged_weights import AveragedWeights, _state_variable
from keras_swa.batch_norm import update_bn
from keras_swa.backend import keras

__all__ = ["SWAG"]


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _swag_update(averages, m2s, deviations, variables, n_averaged, max_rank):
    """One capture: Welford's mean and M2, and the column `w - new_mean` at slot `n % K`."""
    n = n_averaged.read_value()
    first = n == 0
    slot = tf.math.floormod(n, max_rank)
    for average, m2, deviation, variable in zip(averages, m2s, deviations, variables):
        value = tf.cast(variable, tf.float32)
        old = average.read_value()
        new = averaging.swa_update(old, value, n)
        # Welford: M2 += (w - old_mean) * (w - new_mean); the first capture starts it at 0.
        m2.assign(tf.where(first, tf.zeros_like(value), m2 + (value - old) * (value - new)))
        average.assign(new)
        # A scatter into the read value, then one assign: XLA updates the buffer in place, and
        # (unlike `Variable.scatter_nd_update`) it works on mirrored variables under a strategy.
        deviation.assign(
            tf.tensor_scatter_nd_update(
                deviation.read_value(), tf.reshape(slot, [1, 1]), tf.expand_dims(value - new, 0)
            )
        )
    n_averaged.assign_add(1)


def _swag_sample(averages, m2s, deviations, n_averaged, scale, seed, diag, cov, max_rank):
    """One draw `mean + sqrt(scale) * (sqrt(var) * z1 + D z2 / sqrt(rank - 1))`, in fp32."""
    n = tf.cast(n_averaged, tf.float32)
    rank = tf.minimum(n, float(max_rank))
    root = tf.sqrt(scale)
    z2 = tf.random.stateless_normal(
        [max_rank], seed=tf.random.experimental.stateless_fold_in(seed, len(averages))
    )
    samples = []
    for i, (average, m2, deviation) in enumerate(zip(averages, m2s, deviations)):
        noise = tf.zeros_like(average)
        if diag:
            z1 = tf.random.stateless_normal(
                average.shape, seed=tf.random.experimental.stateless_fold_in(seed, i)
            )
            noise += tf.sqrt(tf.maximum(m2 / n, 0.0)) * z1
        if cov:
            # Unfilled columns are zero, so summing over all K columns is the sum over `rank`.
            low_rank = tf.tensordot(z2, deviation, axes=[[0], [0]])
            noise += low_rank / tf.sqrt(rank - 1.0)
        samples.append(average + root * noise)
    return samples


class SWAG(AveragedWeights):
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

    Only trainable variables are modelled. Distribution: like `AveragedWeights`, the statistics
    are mirrored variables under MirroredStrategy or MultiWorkerMirroredStrategy and `update()`
    runs per device; `sample()` draws once and assigns the draw to every replica.

    Args:
        model: a built Keras model (or layer), or a list of trainable variables.
        max_rank: `K`, the number of deviation columns kept (the rank of the low-rank part).
            A positive int. Defaults to 20.
        nonfinite: what `update()` does with NaN/Inf weights, as for `AveragedWeights`:
            `"raise"`, `"skip"` or `"ignore"`. Defaults to `"raise"`.
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

    # SWAG's own compiled update writes the averages beside its statistics, one per variable.
    _pack_below = 0

    def __init__(self, model, max_rank=20, nonfinite="raise", seed=None, name="swag"):
        backend.require_backend("SWAG")
        if not _is_int(max_rank) or max_rank < 1:
            raise ValueError(
                f"`max_rank` must be a positive integer. Received: max_rank={max_rank!r}"
            )
        if seed is not None and not _is_int(seed):
            raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
        super().__init__(model, mode="swa", nonfinite=nonfinite, name=name)
        self._max_rank = int(max_rank)
        # The model itself (untracked, so not checkpointed) for `predict`.
        self._source.model = model if isinstance(model, keras.Model) else None
        self._rng = np.random.default_rng(seed)
        with self._strategy.scope():
            self.m2s = [
                self._statistic(a.shape, f"m2_{i}") for i, a in enumerate(self._own_averages)
            ]
            self.deviations = [
                self._statistic([self._max_rank] + list(a.shape), f"deviations_{i}")
                for i, a in enumerate(self._own_averages)
            ]
        max_rank = self._max_rank
        self._update_fn = tf.function(
            lambda a, m, d, v, n: _swag_update(a, m, d, v, n, max_rank),
            jit_compile=True,
            autograph=False,
        )
        self._sample_fn = tf.function(
            lambda a, m, d, n, scale, seed, diag, cov: _swag_sample(
                a, m, d, n, scale, seed, diag, cov, max_rank
            ),
            jit_compile=True,
            autograph=False,
        )

    @staticmethod
    def _statistic(shape, name):
        return _state_variable(tf.zeros(shape, tf.float32), name)

    # ------------------------------------------------------------------ the update

    def _state(self):
        return (list(self._own_averages), list(self.m2s), list(self.deviations))

    def update(self):
        """Folds the current weights into the mean, the M2 sums and the deviation ring buffer.

        One compiled call; under a `tf.distribute` strategy it runs once per device on that
        device's copies (from the cross-replica context or inside `strategy.run`).

        Returns:
            `True` if the capture was taken; `False` if a non-finite capture was skipped
            (`nonfinite="skip"`). Inside a `tf.function` the result is `None`, and a non-finite
            capture fails a `tf.debugging.Assert` unless `nonfinite="ignore"`.

        Raises:
            FloatingPointError: with `nonfinite="raise"`, if a weight is NaN or infinite; the
                statistics and `n_averaged` are left untouched.
        """
        variables = list(self._tf_variables.variables)
        if self._nonfinite != "ignore":
            if not tf.executing_eagerly():
                finite = tf.reduce_all(self._finite_fn(variables))
                with tf.control_dependencies(
                    [tf.debugging.Assert(finite, ["Non-finite weights: SWAG capture refused."])]
                ):
                    self._apply_update()
                return None
            flags = self._finite_fn(variables).numpy()
            if not self._finite_or_report(flags, poisoned="the SWAG statistics"):
                return False
        self._apply_update()
        return True if tf.executing_eagerly() else None

    def _apply_update(self):
        averages, m2s, deviations = self._state()
        variables = list(self._tf_variables.variables)
        if not self._distributed:
            self._update_fn(averages, m2s, deviations, variables, self.n_averaged)
        elif tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            tf.distribute.get_replica_context().merge_call(self._update_on_each_device)
        elif tf.distribute.has_strategy():
            self._update_on_each_device()
        else:
            with self._strategy.scope():
                self._update_on_each_device()

    def _update_on_each_device(self, strategy=None):
        strategy = strategy or self._strategy

        def local_update(n_averaged, averages, m2s, deviations, variables):
            self._update_fn(list(averages), list(m2s), list(deviations), list(variables),
                            n_averaged)

        strategy.extended.update(
            self._count,
            local_update,
            args=(*self._state(), list(self._tf_variables.variables)),
            group=True,
        )

    def reset(self):
        """Forgets every capture: mean, variance and deviation columns start afresh."""
        for variable in [v for group in self._state() for v in group]:
            variable.assign(tf.zeros_like(variable))
        self.n_averaged.assign(0)

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
        return [tf.identity(a) for a in self.averages]

    def variances(self):
        """The diagonal variance (ddof=0) of the captures, one fp32 tensor per variable."""
        self._require_captures()
        n = tf.cast(self.n_averaged, tf.float32)
        return [tf.maximum(m2 / n, 0.0) for m2 in self.m2s]

    def deviation_columns(self):
        """The low-rank factor `D`: the last `rank` columns `w_i - mean_i`, oldest first.

        Returns:
            One fp32 tensor per tracked variable, of shape `(rank,) + variable.shape`.
        """
        self._require_captures()
        n, k = int(self.n_averaged.numpy()), self.rank
        order = [(n - k + j) % self._max_rank for j in range(k)]
        return [tf.gather(d, order) for d in self.deviations]

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
        if not _is_int(seed):
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
        seed = tf.constant(self._seed(seed), tf.int64)
        averages, m2s, deviations = self._state()
        return self._sample_fn(
            averages, m2s, deviations, self.n_averaged, tf.constant(float(scale)), seed,
            diag, cov,
        )

    def sample(self, scale=0.5, diag=True, cov=True, seed=None):
        """Writes one weight sample into the model (recompute BatchNorm statistics after).

        Args:
            scale: non-negative factor of the covariance. Defaults to 0.5 (the paper's).
            diag: include the diagonal part. Defaults to `True`.
            cov: include the low-rank part (needs `rank >= 2`). Defaults to `True`.
            seed: int seed for this draw. Defaults to `None`.
        """
        self._assign(list(self._source.variables), self.sample_vector(scale, diag, cov, seed))

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
        if not _is_int(num_samples) or num_samples < 1:
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
        seeds = rng.integers(0, 2**31 - 1, size=num_samples)
        total = None
        with _restored(model):
            for draw_seed in seeds:
                self.sample(scale, diag, cov, seed=int(draw_seed))
                if has_bn:
                    update_bn(model, bn_data, batch_size=bn_batch_size, verbose=0)
                out = model.predict(x, batch_size=batch_size, verbose=0)
                out = tf.nest.map_structure(
                    lambda o: _probabilities(o, from_logits), out
                )
                total = out if total is None else tf.nest.map_structure(np.add, total, out)
        return tf.nest.map_structure(lambda t: (t / num_samples).astype(np.float32), total)

    def _model(self):
        model = getattr(self._source, "model", None)
        if model is None:
            raise ValueError(
                "`predict` needs the model: create the SWAG from a Keras model, not from a "
                "list of variables."
            )
        return model


def _probabilities(output, from_logits):
    output = np.asarray(output, dtype=np.float64)
    if not from_logits:
        return output
    shifted = output - output.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@contextlib.contextmanager
def _restored(model):
    """Restores every variable of `model` (weights and statistics) exactly on exit."""
    variables = list(model.variables)
    backup = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
    try:
        yield
    finally:
        for v, value in zip(variables, backup):
            v.assign(value)
