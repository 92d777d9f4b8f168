"""On JAX, `tf.train.Checkpoint` refuses keras_swa's state instead of saving nothing of it.

Runs with `KERAS_BACKEND=jax` (the JAX pass of scripts/test.sh); skipped on other backends. The
state is `keras.Variable`s there, which a TensorFlow checkpoint cannot carry: a checkpoint that
accepted the objects would write and restore no average and no count, without an error. The
supported ways to save it on JAX (`save_weights`/`load_weights`, `SWA(backup_dir=...)`) are
tested in tests/test_averaged_weights_jax.py and tests/test_resume.py.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_swa import FGE, SWAG, AveragedWeights
from keras_swa.backend import keras

pytestmark = pytest.mark.jax_only


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def _captured(cls):
    model = _model()
    state = cls(model)
    for _ in range(2):
        model.set_weights([w + 1.0 for w in model.get_weights()])
        state.add() if cls is FGE else state.update()
    return state


@pytest.mark.parametrize("cls", [AveragedWeights, SWAG, FGE], ids=lambda c: c.__name__)
def test_tf_checkpoint_refuses_the_state_on_jax(cls, tmp_path):
    state = _captured(cls)
    with pytest.raises(ValueError, match="trackable"):
        tf.train.Checkpoint(swa=state)
    # Nothing the user had is touched by the refused attempts.
    count = len(state) if cls is FGE else int(state.n_averaged.numpy())
    assert count == 2


def test_save_weights_still_round_trips_on_jax(tmp_path):
    model = _model()
    averaged = AveragedWeights(model)
    snapshots = []
    for step in range(3):
        model.set_weights([w + step for w in model.get_weights()])
        snapshots.append([np.array(w) for w in model.get_weights()])
        averaged.update()
    path = str(tmp_path / "swa.weights.h5")
    averaged.save_weights(path)
    restored = AveragedWeights(model)
    restored.load_weights(path)
    assert int(restored.n_averaged.numpy()) == 3
    for i, average in enumerate(restored.averages):
        np.testing.assert_allclose(
            np.asarray(average), np.mean([s[i] for s in snapshots], axis=0), rtol=1e-6
        )
