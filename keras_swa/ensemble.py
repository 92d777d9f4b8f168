"""Ensemble prediction: the average of the predicted probabilities of several weight sets.

`SWAG.predict` (Bayesian model averaging over weight draws, Maddox et al. 2019) and
`FGE.predict` (the snapshots of a cyclic run, Garipov et al. 2018) both write one weight set
after another into the same model, optionally recompute its BatchNorm statistics for that set
(`keras_swa.update_bn`), run `model.predict`, and average the probabilities in float64. The
model's variables are restored exactly afterwards, also on error.
"""

import numpy as np

from keras_swa.backend import nest
from keras_swa.batch_norm import update_bn
from keras_swa.model_variables import restored

__all__ = ["average_probabilities", "probabilities"]


def probabilities(output, from_logits):
    """`output` as float64 probabilities: a softmax over the last axis if `from_logits`.

    Example:

    >>> import numpy as np
    >>> probabilities(np.log([[1.0, 3.0]]), from_logits=True).round(2).tolist()
    [[0.25, 0.75]]
    """
    output = np.asarray(output, dtype=np.float64)
    if not from_logits:
        return output
    shifted = output - output.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def average_probabilities(model, load_member, num_members, x, bn_data=None, batch_size=None,
                          bn_batch_size=None, from_logits=False):
    """The mean over members of `model.predict(x)` with each member's weights in the model.

    Args:
        model: the Keras model the members are written into.
        load_member: `load_member(j)` writes member `j` (0 <= j < num_members) into `model`.
        num_members: how many members, a positive int.
        x: inputs, anything `model.predict` accepts.
        bn_data: data to recompute the BatchNorm statistics of each member with
            `keras_swa.update_bn`. Defaults to `None` (keep those `load_member` wrote).
        batch_size: batch size of `model.predict`. Defaults to `None`.
        bn_batch_size: batch size of array `bn_data`. Defaults to `None`.
        from_logits: apply a softmax (last axis) to each member's output first.
            Defaults to `False`.

    Returns:
        The averaged probabilities as float32 NumPy array(s), structured like the output.

    Example:

    >>> import numpy as np
    >>> from keras_swa.backend import keras
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)])
    >>> bias = model.layers[0].bias
    >>> average_probabilities(model, lambda j: bias.assign([0.0, 0.0]), 1,
    ...                       np.zeros((1, 1), "float32"), from_logits=True).tolist()
    [[0.5, 0.5]]
    """
    total = None
    with restored(model):
        for index in range(num_members):
            load_member(index)
            if bn_data is not None:
                update_bn(model, bn_data, batch_size=bn_batch_size, verbose=0)
            out = model.predict(x, batch_size=batch_size, verbose=0)
            out = nest.map_structure(lambda o: probabilities(o, from_logits), out)
            total = out if total is None else nest.map_structure(np.add, total, out)
    return nest.map_structure(lambda t: (t / num_members).astype(np.float32), total)
