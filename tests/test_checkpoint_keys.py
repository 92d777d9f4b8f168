"""The checkpoint keys of keras_swa's state on TensorFlow, pinned.

`tf.train.Checkpoint` (and `BackupAndRestore` through
`keras_swa.backends.tensorflow_backup.StateBackup`) saves a `tf.Module`'s variables under the
names of the attributes that hold them. The TensorFlow state lives in
`keras_swa.backends.tensorflow*`, but `AveragedWeights` and `SWAG` hold its variables
under the names their checkpoints have always had; a checkpoint written before must restore
after any move of the code. The expected keys are written out here, not computed from the code.
"""

import pytest
import tensorflow as tf

from keras_swa import SWAG, AveragedWeights
from keras_swa.backend import keras
from keras_swa.backends.tensorflow_backup import StateBackup

pytestmark = pytest.mark.tf_only("tf.train.Checkpoint carries the tf.Variables of TensorFlow")

_VALUE = ".ATTRIBUTES/VARIABLE_VALUE"


def _model():
    # One kernel of >= 16,384 floats (an average of its own) and 5 small variables (packed).
    return keras.Sequential(
        [keras.Input((200,)), keras.layers.Dense(200), keras.layers.Dense(7),
         keras.layers.Dense(3)]
    )


def _keys(state, tmp_path, name="swa"):
    state.update()
    path = tf.train.Checkpoint(**{name: state}).write(str(tmp_path / "ckpt"))
    return sorted(k for k, _ in tf.train.list_variables(path))


def test_averaged_weights_keys(tmp_path):
    assert _keys(AveragedWeights(_model()), tmp_path) == [
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        f"swa/_count/{_VALUE}",
        f"swa/_own_averages/0/{_VALUE}",
        f"swa/_packed_averages/{_VALUE}",
    ]


def test_averaged_weights_keys_with_a_custom_rule(tmp_path):
    # A user's rule may not be elementwise: one average per variable, nothing packed.
    averaged = AveragedWeights(_model(), avg_fn=lambda a, w, n: tf.maximum(a, w))
    expected = ["_CHECKPOINTABLE_OBJECT_GRAPH", f"swa/_count/{_VALUE}"] + [
        f"swa/_own_averages/{i}/{_VALUE}" for i in range(6)
    ]
    assert _keys(averaged, tmp_path) == expected


def test_swag_keys(tmp_path):
    expected = (
        ["_CHECKPOINTABLE_OBJECT_GRAPH", f"swag/_count/{_VALUE}"]
        + [f"swag/_own_averages/{i}/{_VALUE}" for i in range(6)]
        + [f"swag/deviations/{i}/{_VALUE}" for i in range(6)]
        + [f"swag/m2s/{i}/{_VALUE}" for i in range(6)]
    )
    assert _keys(SWAG(_model(), max_rank=3), tmp_path, name="swag") == expected


def test_state_backup_keys(tmp_path):
    averaged = AveragedWeights(_model())
    averaged.update()
    backup = StateBackup(str(tmp_path), averaged)
    backup.save(3, {"epoch": 1})
    path = tf.train.latest_checkpoint(backup.directory)
    assert sorted(k for k, _ in tf.train.list_variables(path)) == [
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        f"averaged/_count/{_VALUE}",
        f"averaged/_own_averages/0/{_VALUE}",
        f"averaged/_packed_averages/{_VALUE}",
        f"save_counter/{_VALUE}",
        "state/.ATTRIBUTES/py_state",
    ]
