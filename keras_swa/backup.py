"""Crash-safe SWA state: checkpoints of the averages keyed by the optimizer step.

`keras.callbacks.BackupAndRestore` saves the model and optimizer (and so `optimizer.iterations`)
and resumes `fit` after a crash. The SWA state -- the averages, `n_averaged`, where the SWA phase
started and which captures were made -- lives outside the model, so `keras_swa.SWA` saves it
itself with `tf.train.CheckpointManager` whenever BackupAndRestore would (every epoch, or every
N steps). Each checkpoint is numbered by `optimizer.iterations`, and on resume the one whose number
equals the restored `optimizer.iterations` is loaded: the averages then match the restored weights
exactly, whichever of the two callbacks saved first before the crash, and no capture is lost or
counted twice. `tf.train.CheckpointManager` writes the index last, so a crash mid-save leaves the
previous checkpoints usable.
"""

import json
import os
import re
import shutil

import tensorflow as tf

__all__ = ["StateBackup"]

_NAME = "swa_state"


class StateBackup:
    """Saves and restores a trackable (the averages) plus a JSON-able dict, keyed by a step.

    Args:
        directory: where the checkpoints go (a `keras_swa` folder inside it is used).
        trackable: the `tf.Module` to save (an `AveragedWeights`).
        max_to_keep: how many step-numbered checkpoints to keep. Defaults to 3.
    """

    def __init__(self, directory, trackable, max_to_keep=3):
        self.directory = os.path.join(os.fspath(directory), "keras_swa")
        self._state = tf.Variable("", dtype=tf.string, trainable=False, name="swa_python_state")
        self._checkpoint = tf.train.Checkpoint(averaged=trackable, state=self._state)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self.directory, max_to_keep=max_to_keep, checkpoint_name=_NAME
        )

    def steps(self):
        """The steps for which a checkpoint exists, oldest first."""
        out = []
        for path in self._manager.checkpoints:
            match = re.search(rf"{_NAME}-(\d+)$", path)
            if match:
                out.append(int(match.group(1)))
        return out

    def save(self, step, state):
        """Saves the trackable and `state` (a JSON-able dict) as the checkpoint of `step`."""
        self._state.assign(json.dumps(state))
        self._manager.save(checkpoint_number=int(step))

    def restore(self, step):
        """Loads the checkpoint of `step` into the trackable and returns its state dict.

        Raises:
            FileNotFoundError: if there is no checkpoint for `step`, naming the ones there are.
        """
        for path in self._manager.checkpoints:
            if path.endswith(f"{_NAME}-{int(step)}"):
                self._checkpoint.restore(path).assert_existing_objects_matched()
                return json.loads(self._state.numpy().decode("utf-8"))
        raise FileNotFoundError(
            f"No SWA state was saved at optimizer step {int(step)} in {self.directory!r} "
            f"(saved steps: {self.steps()}). The model was restored to that step, so the "
            "averages would not match it. Put keras_swa.SWA before BackupAndRestore in the "
            "callbacks list and give both the same save frequency."
        )

    def delete(self):
        """Removes the saved state (after training has finished)."""
        shutil.rmtree(self.directory, ignore_errors=True)
