"""Crash-safe SWA state on TensorFlow: checkpoints of the averages, keyed by optimizer step.

`keras.callbacks.BackupAndRestore` saves the model and optimizer (and so `optimizer.iterations`)
and resumes `fit` after a crash. The SWA state -- the averages, `n_averaged`, where the SWA phase
started and which captures were made -- lives outside the model, so `keras_swa.SWA` saves it
itself with `tf.train.CheckpointManager` whenever BackupAndRestore would (every epoch, or every
N steps). Each checkpoint is numbered by `optimizer.iterations`, and on resume the one whose number
equals the restored `optimizer.iterations` is loaded: the averages then match the restored weights
exactly, whichever of the two callbacks saved first before the crash, and no capture is lost or
counted twice. `tf.train.CheckpointManager` writes the index last, so a crash mid-save leaves the
previous checkpoints usable. (On the other backends, where `tf.train.Checkpoint` cannot carry
the state, `keras_swa.backup_files` keeps it in `.weights.h5` + JSON files instead.)

Under `tf.distribute.MultiWorkerMirroredStrategy` this follows Keras' own BackupAndRestore
(tf_keras `distribute/worker_training_state.py` and `distributed_file_utils.py`): every worker
saves, since saving distributed variables is done by all workers together, but only the chief
(`strategy.extended.should_checkpoint`) writes the real directory; every other worker writes a
worker-specific temporary directory next to it and deletes it after each save. Every worker
restores from the chief's directory, so it must be on storage that all workers can read.
"""

import json
import os
import re
import shutil

import tensorflow as tf

from keras_swa import distribution

__all__ = ["StateBackup"]

_NAME = "swa_state"
_SUBDIR = "keras_swa"


class _JSONState(tf.train.experimental.PythonState):
    """A JSON-able dict carried by a `tf.train.Checkpoint` (no variable, so no collective)."""

    def __init__(self):
        self.value = {}

    def serialize(self):
        return json.dumps(self.value)

    def deserialize(self, string_value):
        if isinstance(string_value, bytes):
            string_value = string_value.decode("utf-8")
        self.value = json.loads(string_value)


class StateBackup:
    """Saves and restores a trackable (the averages) plus a JSON-able dict, keyed by a step.

    Under a multi-worker strategy every worker must call `save` and `delete` at the same points
    (as `keras_swa.SWA` does); the chief writes `directory/keras_swa`, the other workers write
    `directory/keras_swa_workertemp_<task id>` and remove it after each save, and `restore` reads
    the chief's checkpoints on every worker.

    Args:
        directory: where the checkpoints go (a `keras_swa` folder inside it is used).
        trackable: the `tf.Module` to save (an `AveragedWeights`).
        strategy: the `tf.distribute.Strategy` the trackable's variables belong to.
            Defaults to `None` (the strategy in scope).
        max_to_keep: how many step-numbered checkpoints to keep. Defaults to 3.

    Example:

    >>> import os, tempfile
    >>> import keras_swa
    >>> from keras_swa.backend import keras  # Keras 3, or tf_keras with TF_USE_LEGACY_KERAS=1
    >>> from keras_swa.backends.tensorflow_backup import StateBackup
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> averaged = keras_swa.AveragedWeights(model)
    >>> backup = StateBackup(tempfile.mkdtemp(), averaged)
    >>> _ = averaged.update()
    >>> backup.save(7, {"captures": [7]})
    >>> _ = averaged.update()
    >>> backup.restore(7), int(averaged.n_averaged)
    ({'captures': [7]}, 1)
    >>> backup.steps()
    [7]
    >>> backup.delete()
    >>> os.path.exists(backup.directory)
    False
    """

    def __init__(self, directory, trackable, strategy=None, max_to_keep=3):
        directory = os.fspath(directory)
        self._strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        self.directory = os.path.join(directory, _SUBDIR)
        self.is_chief = distribution.is_chief(self._strategy)
        self._state = _JSONState()
        self._checkpoint = tf.train.Checkpoint(averaged=trackable, state=self._state)
        # The chief's checkpoints, read by every worker.
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self.directory, max_to_keep=max_to_keep, checkpoint_name=_NAME
        )
        if self.is_chief:
            self.write_directory = self.directory
            self._write_manager = self._manager
        else:
            task_id = self._strategy.cluster_resolver.task_id
            self.write_directory = os.path.join(directory, f"{_SUBDIR}_workertemp_{task_id}")
            self._write_manager = tf.train.CheckpointManager(
                self._checkpoint, self.write_directory, max_to_keep=1, checkpoint_name=_NAME
            )

    def steps(self):
        """The steps for which a checkpoint exists (in the chief's directory), oldest first."""
        out = []
        for path in self._manager.checkpoints:
            match = re.search(rf"{_NAME}-(\d+)$", path)
            if match:
                out.append(int(match.group(1)))
        return out

    def save(self, step, state):
        """Saves the trackable and `state` (a JSON-able dict) as the checkpoint of `step`."""
        self._state.value = state
        self._write_manager.save(checkpoint_number=int(step))
        if not self.is_chief:
            shutil.rmtree(self.write_directory, ignore_errors=True)

    def restore(self, step):
        """Loads the checkpoint of `step` into the trackable and returns its state dict.

        Raises:
            FileNotFoundError: if there is no checkpoint for `step`, naming the ones there are.
        """
        for path in self._manager.checkpoints:
            if path.endswith(f"{_NAME}-{int(step)}"):
                self._checkpoint.restore(path).assert_existing_objects_matched()
                return self._state.value
        raise FileNotFoundError(
            f"No SWA state was saved at optimizer step {int(step)} in {self.directory!r} "
            f"(saved steps: {self.steps()}). The model was restored to that step, so the "
            "averages would not match it. Put keras_swa.SWA before BackupAndRestore in the "
            "callbacks list and give both the same save frequency; with several workers, "
            "`backup_dir` must be on storage that every worker can read."
        )

    def delete(self):
        """Removes the saved state (after training has finished).

        With several workers this waits until every worker has got here, so the chief never
        deletes a checkpoint that another worker has still to restore.
        """
        if not self.is_chief:
            shutil.rmtree(self.write_directory, ignore_errors=True)
        if isinstance(self._strategy, tf.distribute.MultiWorkerMirroredStrategy):
            _barrier(self._strategy)
        if self.is_chief:
            shutil.rmtree(self.directory, ignore_errors=True)


def _barrier(strategy):
    """Returns once every worker of `strategy` has called it (one all-reduce of a scalar)."""

    @tf.function
    def count_workers():
        ones = strategy.run(lambda: tf.constant(1, tf.int32))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

    count_workers()
