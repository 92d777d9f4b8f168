"""Crash-safe SWA state in plain files, for Keras backends without `tf.train.Checkpoint` (JAX).

`keras_swa.backends.tensorflow_backup.StateBackup` keeps the SWA state in TensorFlow
checkpoints, which only hold TensorFlow variables. On JAX the averages are `keras.Variable`s
backed by `jax.Array`s, so `FileStateBackup` keeps the same state in the files Keras 3 itself uses: the averages and
`n_averaged` in a `.weights.h5` file (`AveragedWeights.save_weights`, with its fingerprint of
the averaging rule and the shapes), and the callback's own bookkeeping (captures, start step) in
a small JSON file. The interface is `StateBackup`'s: `save(step, state)`, `restore(step)`,
`steps()`, `delete()`, so `keras_swa.SWA` restores the state of exactly the step that
`keras.callbacks.BackupAndRestore` restored.

Layout of `directory/keras_swa`, and why a crash at any point leaves a usable backup:

- `swa_state-<step>-<token>.weights.h5`: the averages of `step`, written first;
- `swa_state-<step>-<token>.json`: the state of `step` and the name of its `.weights.h5`, second;
- `index.json`: which pair is complete for each saved step, replaced last.

Every file is written under a temporary name and moved into place with `os.replace`, and each
save uses a fresh `<token>`, so a save never overwrites a file the index names (even when the
same step is saved again after a resume). A crash before `index.json` is replaced leaves the
previous index naming the previous complete pairs; files no index names are removed by the next
save. A backup this module did not write (a TensorFlow checkpoint, another layout version, a
pair that does not belong together) is refused with a `ValueError`, never partly restored.

Only one process writes (JAX multi-process training is not supported by this backup).
"""

import json
import os
import re
import shutil
import uuid

from keras_swa import weights_file

__all__ = ["FileStateBackup"]

_SUBDIR = "keras_swa"
_INDEX = "index.json"
_NAME = "swa_state"
_FORMAT = "keras_swa.SWA backup"
# The layout of the files above; a backup of another layout is refused, not read.
LAYOUT_VERSION = 1
_FILE = re.compile(rf"^{_NAME}-(\d+)-([0-9a-f]+)(\.json|{re.escape(weights_file.SUFFIX)})$")


def _write_json(path, value):
    """Writes `value` as JSON to `path` atomically: a temporary file, fsync, then a rename."""
    temporary = os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
    )
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"The SWA backup's {what} is not readable JSON, so this backup cannot be resumed "
            f"from. Delete it to start afresh. Received: path={path!r} ({error})"
        ) from None


class FileStateBackup:
    """Saves and restores an `AveragedWeights` plus a JSON-able dict, keyed by a step, in files.

    Args:
        directory: where the files go (a `keras_swa` folder inside it is used).
        averaged: the `AveragedWeights` to save (with `save_own_variables` /
            `load_own_variables`).
        max_to_keep: how many step-numbered pairs to keep. Defaults to 3.

    Raises:
        ValueError: if the folder holds a backup this class did not write (a TensorFlow
            checkpoint of `keras_swa.backends.tensorflow_backup.StateBackup`, or another
            layout version).

    Example:

    >>> import os, tempfile
    >>> import keras_swa
    >>> from keras_swa.backend import keras
    >>> from keras_swa.backup_files import FileStateBackup
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> averaged = keras_swa.AveragedWeights(model)
    >>> backup = FileStateBackup(tempfile.mkdtemp(), averaged)
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

    def __init__(self, directory, averaged, max_to_keep=3):
        self.directory = os.path.join(os.fspath(directory), _SUBDIR)
        self.write_directory = self.directory
        self.is_chief = True
        self._averaged = averaged
        self._max_to_keep = int(max_to_keep)
        self._pairs = self._read_index()  # {step: json file name}, checked now, before training

    # ------------------------------------------------------------------ the index

    def _read_index(self):
        path = os.path.join(self.directory, _INDEX)
        if not os.path.exists(path):
            if os.path.exists(os.path.join(self.directory, "checkpoint")):
                raise ValueError(
                    f"{self.directory!r} holds a TensorFlow checkpoint of SWA's state (written "
                    "on the TensorFlow backend), which cannot be restored on this Keras "
                    f"backend ({_backend()!r}). Resume with the backend that wrote it, or "
                    "delete the backup folder to start afresh. "
                    f"Received: backup_dir={os.path.dirname(self.directory)!r}"
                )
            return {}
        index = _read_json(path, "index")
        if not isinstance(index, dict) or index.get("format") != _FORMAT:
            raise ValueError(
                f"{path!r} was not written by keras_swa.SWA(backup_dir=...), so this backup "
                "cannot be resumed from. Delete it to start afresh. "
                f"Received: format={index.get('format') if isinstance(index, dict) else index!r}"
            )
        if index.get("layout") != LAYOUT_VERSION:
            raise ValueError(
                f"This SWA backup has layout version {index.get('layout')!r} (written by "
                f"keras_swa {index.get('keras_swa_version')!r}); this keras_swa reads layout "
                f"{LAYOUT_VERSION}. Finish that run with the keras_swa that wrote it, or delete "
                f"{self.directory!r} to start afresh. Received: layout={index.get('layout')!r}"
            )
        return {int(step): name for step, name in index["pairs"].items()}

    def _write_index(self, pairs):
        from keras_swa.version import __version__

        _write_json(
            os.path.join(self.directory, _INDEX),
            {
                "format": _FORMAT,
                "layout": LAYOUT_VERSION,
                "keras_swa_version": __version__,
                "pairs": {str(step): name for step, name in sorted(pairs.items())},
            },
        )

    # ------------------------------------------------------------------ public interface

    def steps(self):
        """The steps for which a complete pair exists, oldest first."""
        return sorted(self._pairs)

    def save(self, step, state):
        """Saves the averages and `state` (a JSON-able dict) as the pair of `step`.

        The `.weights.h5` file, then the JSON file, then the index: a crash before the index is
        replaced leaves the previous complete pairs as they were.
        """
        step = int(step)
        os.makedirs(self.directory, exist_ok=True)
        stem = f"{_NAME}-{step}-{uuid.uuid4().hex}"
        weights_name = stem + weights_file.SUFFIX
        store = {}
        self._averaged.save_own_variables(store)
        weights_file.write(os.path.join(self.directory, weights_name), store)
        _write_json(
            os.path.join(self.directory, stem + ".json"),
            {
                "format": _FORMAT,
                "layout": LAYOUT_VERSION,
                "step": step,
                "weights": weights_name,
                "n_averaged": int(store["n_averaged"]),
                "state": state,
            },
        )
        pairs = dict(self._pairs)
        pairs[step] = stem + ".json"
        for old in sorted(pairs)[: max(len(pairs) - self._max_to_keep, 0)]:
            del pairs[old]
        self._write_index(pairs)
        self._pairs = pairs
        self._remove_unindexed()

    def _remove_unindexed(self):
        """Removes the pairs the index no longer names, and leftovers of interrupted saves."""
        keep = set()
        for name in self._pairs.values():
            keep.add(name)
            keep.add(name[: -len(".json")] + weights_file.SUFFIX)
        for name in os.listdir(self.directory):
            leftover = name.startswith(".") and name.endswith(".tmp")
            if (_FILE.match(name) and name not in keep) or leftover:
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    def restore(self, step):
        """Loads the pair of `step` into the averages and returns its state dict.

        Everything is read and checked before the averages are written.

        Raises:
            FileNotFoundError: if there is no complete pair for `step`, naming the saved steps.
            ValueError: if the pair is not one this class wrote, or its two files do not belong
                together, or the averages were saved from other variables or another rule.
        """
        step = int(step)
        self._pairs = self._read_index()
        if step not in self._pairs:
            raise FileNotFoundError(
                f"No SWA state was saved at optimizer step {step} in {self.directory!r} "
                f"(saved steps: {self.steps()}). The model was restored to that step, so the "
                "averages would not match it. Put keras_swa.SWA before BackupAndRestore in the "
                "callbacks list and give both the same save frequency."
            )
        json_path = os.path.join(self.directory, self._pairs[step])
        saved = _read_json(json_path, f"state of step {step}")
        if (
            not isinstance(saved, dict)
            or saved.get("format") != _FORMAT
            or saved.get("layout") != LAYOUT_VERSION
            or saved.get("step") != step
        ):
            raise ValueError(
                f"{json_path!r} is not the SWA state of step {step} in layout {LAYOUT_VERSION}. "
                f"Delete {self.directory!r} to start afresh. Received: "
                f"step={saved.get('step') if isinstance(saved, dict) else saved!r}"
            )
        store = weights_file.read(os.path.join(self.directory, saved["weights"]))
        if "n_averaged" not in store or int(store["n_averaged"]) != saved["n_averaged"]:
            raise ValueError(
                f"The averages of step {step} do not belong to its state: the state counts "
                f"{saved['n_averaged']} captures. Delete {self.directory!r} to start afresh. "
                f"Received: n_averaged={store.get('n_averaged')!r}"
            )
        try:
            self._averaged.load_own_variables(store)
        except ValueError as error:
            raise ValueError(
                f"The SWA backup of step {step} in {self.directory!r} was saved from another "
                f"model or averaging rule, so it is not resumed from: {error}"
            ) from error
        return saved["state"]

    def delete(self):
        """Removes the saved state (after training has finished)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _backend():
    from keras_swa.backend import backend_name

    return backend_name()
