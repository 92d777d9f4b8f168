"""`FGE`: Fast Geometric Ensembling, an ensemble of the snapshots at the cycle minima.

Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018,
arXiv 1802.10026, train with a short cyclic learning rate and keep the weights at the end of
each cycle, where the learning rate is at its minimum; the ensemble predicts the average of the
members' probabilities. It is the sibling of SWA (which averages the same snapshots' *weights*
into one model): use it with `keras_swa.schedules.Cyclic` and capture where the learning rate
is `swa_lr_min`.

Each snapshot is an exact copy of all the model's weights in their own dtype -- trainable
weights and the BatchNorm moving statistics at the capture, since every member is an actual SGD
iterate whose own statistics were collected along the trajectory (Garipov et al. use them as
they are). `predict(..., bn_data=...)` can recompute them per member instead. Memory: one full
copy of the model's weights per member.
"""

import numpy as np

from keras_swa import (
    backend,
    distribution,
    ensemble,
    export,
    fge_store,
    model_variables,
    weights_file,
)
from keras_swa.arguments import is_int
from keras_swa.backend import keras, nest
from keras_swa.lazy_tensorflow import tf

__all__ = ["FGE"]


def _snapshot(value, name):
    """A member's copy of one weight: a `tf.Variable` on TensorFlow, a `keras.Variable` on JAX."""
    if backend.backend_name() == "jax":
        return keras.Variable(value, dtype=value.dtype, trainable=False, name=name)
    return tf.Variable(value, trainable=False, name=name)


def _value(snapshot):
    """The value of a member's snapshot (a `jax.Array` on JAX, the `tf.Variable` elsewhere)."""
    return snapshot.value if backend.backend_name() == "jax" else snapshot


class FGE(backend.StateModule, weights_file.WeightsFileMethods):
    """A Fast Geometric Ensemble: snapshots of a model whose probabilities are averaged.

    Call `add()` at the end of every learning-rate cycle; `predict()` returns the average of
    the members' predicted probabilities, and `export_saved_model()` writes one SavedModel whose
    serving signature returns that average, without keras_swa.

    The snapshots are `tf.Variable`s of this `tf.Module` (`members[j]` lists member `j`'s
    weights in the order of `model.weights`), so `tf.train.Checkpoint` carries them once the
    same number of members exists on restore. Single device; under a `tf.distribute` strategy
    the snapshots are taken from the model's (mirrored) weights but not mirrored themselves.
    On JAX the snapshots are `keras.Variable` copies (synced from a running `fit`, never the
    model's own buffers), which `tf.train.Checkpoint` cannot carry: it refuses the `FGE` there
    (`keras_swa.backend.StateModule`). On every backend `save_weights` / `load_weights` keep
    the members in a `.weights.h5` file (`keras_swa.fge_store`).

    Args:
        model: a built Keras model (functional or Sequential for `export_saved_model`).
        max_members: keep at most this many snapshots, dropping the oldest. Defaults to `None`
            (keep all).
        name: name of the module. Defaults to `"fge"`.

    Example:

    >>> import numpy as np
    >>> from keras_swa.backend import keras
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    >>> fge = FGE(model)
    >>> fge.add()                   # in practice: at the end of each cycle, e.g. from
    >>> _ = model.layers[0].bias.assign([1.0, -1.0])
    >>> fge.add()                   # keras.callbacks.LambdaCallback(on_epoch_end=...)
    >>> len(fge)
    2
    >>> [round(float(p), 2) for p in fge.predict(np.zeros((1, 3), "float32"))[0]]
    [0.69, 0.31]
    """

    def __init__(self, model, max_members=None, name="fge"):
        backend.require_backend("FGE")
        if backend.backend_name() == "jax":
            distribution.check_keras_distribution("keras_swa.FGE")
        super().__init__(name=name)
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"`model` must be a Keras model (`keras.Model`). Received: model={model!r}"
            )
        if not model.built or not model.weights:
            raise ValueError(
                "The model must be built (called on data, or created with an `Input`) before "
                f"it can be snapshotted. Received: model={model.name!r} with built={model.built}"
            )
        if max_members is not None and (not is_int(max_members) or max_members < 1):
            raise ValueError(
                "`max_members` must be a positive integer or None. "
                f"Received: max_members={max_members!r}"
            )
        self._max_members = max_members
        self._model = model_variables.Untracked(model=model)
        self.members = []

    def __len__(self):
        return len(self.members)

    @property
    def model(self):
        """The model the snapshots are taken from."""
        return self._model.model

    def add(self):
        """Snapshots every weight of the model (BatchNorm statistics included) as a new member."""
        index = len(self.members)
        model_variables.sync(self.model)
        values = model_variables.copy_values(self.model.weights)
        snapshot = [_snapshot(value, f"member_{index}_{i}") for i, value in enumerate(values)]
        self.members.append(snapshot)
        if self._max_members is not None and len(self.members) > self._max_members:
            del self.members[0]

    def save_own_variables(self, store):
        """Writes every member into a Keras-style store (`keras_swa.fge_store`).

        `store` is dict-like with string keys (Keras' own H5 store, or a plain `dict`). It gets
        `"member_m_i"`, weight `i` of member `m` (oldest first) in its own dtype, and
        `"fingerprint"` (the member count, the weights' shapes and dtypes), which
        `load_own_variables` checks. The same on every backend.

        Args:
            store: a dict-like, written with `store[key] = numpy_array`.
        """
        members = [[np.asarray(_value(s)) for s in member] for member in self.members]
        fge_store.fill(store, fge_store.fingerprint(self.model.weights, len(members)), members)

    def load_own_variables(self, store):
        """Replaces the members by those saved by `save_own_variables`.

        Everything is read and checked before anything is written: a store saved from another
        model (other shapes or dtypes), or with more members than `max_members`, raises a
        `ValueError` that names the difference, and leaves the members as they were.

        Args:
            store: a dict-like with the keys `save_own_variables` writes.
        """
        weights = self.model.weights
        members = fge_store.read(
            store, fge_store.fingerprint(weights, 0), weights, self._max_members
        )
        model_variables.sync(self.model)
        self.reset()
        for index, member in enumerate(members):
            self.members.append([
                _snapshot(model_variables.placed_like(value, weight), f"member_{index}_{i}")
                for i, (value, weight) in enumerate(zip(member, weights))
            ])

    def reset(self):
        """Drops every member."""
        while self.members:
            self.members.pop()

    def _require_members(self):
        if not self.members:
            raise ValueError(
                "The ensemble has no members yet (len=0): call `add()` at the end of at least "
                "one learning-rate cycle first."
            )

    def assign_member(self, index, model=None):
        """Writes member `index`'s weights (and BatchNorm statistics) into a model.

        Args:
            index: which member, as a list index (negative counts from the end).
            model: a model with the same architecture. Defaults to the ensemble's model.
        """
        self._require_members()
        if not is_int(index) or not -len(self.members) <= index < len(self.members):
            raise IndexError(
                f"`index` must be an int in [-{len(self.members)}, {len(self.members)}). "
                f"Received: index={index!r}"
            )
        model = self.model if model is None else model
        weights = model.weights
        member = self.members[index]
        if len(weights) != len(member) or any(
            tuple(w.shape) != tuple(m.shape) for w, m in zip(weights, member)
        ):
            raise ValueError(
                "The model's weights do not match the snapshots (number or shapes differ). "
                f"Received: model={getattr(model, 'name', model)!r}"
            )
        model_variables.sync(model)
        model_variables.assign_values(weights, [_value(m) for m in member])

    def predict(self, x, bn_data=None, batch_size=None, bn_batch_size=None, from_logits=False):
        """The average of the members' predicted probabilities.

        Every member is written into the model in turn (with `bn_data`, its BatchNorm
        statistics are then recomputed by `keras_swa.update_bn`; otherwise its own statistics
        from the capture are used), and `model.predict(x)` is run. The model's variables are
        restored exactly afterwards, also on error.

        Args:
            x: inputs, anything `model.predict` accepts.
            bn_data: optional data to recompute each member's BatchNorm statistics. Defaults to
                `None` (use the statistics stored with each member).
            batch_size: batch size of `model.predict`. Defaults to `None`.
            bn_batch_size: batch size of array `bn_data`. Defaults to `None`.
            from_logits: the model outputs logits: apply a softmax (last axis) to each member's
                output before averaging. Defaults to `False`.

        Returns:
            The averaged probabilities as float32 NumPy array(s), structured like the model's
            output.
        """
        self._require_members()
        return ensemble.average_probabilities(
            self.model,
            self.assign_member,
            len(self.members),
            x,
            bn_data=bn_data,
            batch_size=batch_size,
            bn_batch_size=bn_batch_size,
            from_logits=from_logits,
        )

    def ensemble_model(self, from_logits=False):
        """A Keras model whose output is the average of the members' probabilities.

        It holds one clone of the model per member (`keras.models.clone_model`, weights from
        the member), all fed by the same inputs: memory and compute are `len(self)` times
        those of one model. BatchNorm statistics are those stored with each member.

        Args:
            from_logits: apply a softmax (last axis) to each member's output first.
                Defaults to `False`.

        Returns:
            A functional `keras.Model` with the model's inputs.
        """
        self._require_members()
        model = self.model
        inputs = export.model_inputs(model)
        if inputs is None:
            raise ValueError(
                "The ensemble can only be built for a model with symbolic inputs (functional, "
                "or Sequential with `keras.Input`); subclassed models cannot be cloned. "
                f"Received: model={model.name!r}"
            )
        outputs = []
        for index, member in enumerate(self.members):
            clone = keras.models.clone_model(model)
            clone.set_weights([np.asarray(m.numpy()) for m in member])
            # A uniquely named wrapper: the clones all carry the model's name.
            clone = keras.Model(clone.inputs, clone.outputs, name=f"member_{index}")
            out = clone(inputs, training=False)
            if from_logits:
                out = nest.map_structure(
                    lambda o: keras.layers.Softmax(axis=-1)(o), out
                )
            outputs.append(out)
        if len(outputs) == 1:
            averaged = outputs[0]
        else:
            averaged = nest.map_structure(
                lambda *o: keras.layers.Average()(list(o)), *outputs
            )
        return keras.Model(inputs, averaged, name=f"{model.name}_fge_{len(outputs)}")

    def export_saved_model(self, path, overwrite=False, from_logits=False):
        """Writes the ensemble as ONE SavedModel serving the averaged probabilities.

        The SavedModel is `keras_swa.export_saved_model(self.ensemble_model(from_logits))`:
        the same named inputs as the model, the same output names (`output_0` for a single
        output), written atomically; it loads and serves without keras_swa.

        Args:
            path: the directory to create.
            overwrite: replace an existing SavedModel at `path`. Defaults to `False`.
            from_logits: the model outputs logits; serve softmax averages. Defaults to `False`.

        Returns:
            The absolute path of the SavedModel, as a `str`.
        """
        return export.export_saved_model(
            self.ensemble_model(from_logits=from_logits), path, overwrite=overwrite
        )
