"""`keras_swa.backup_files.FileStateBackup`: SWA's crash-safe state as `.weights.h5` + JSON pairs.

The backup `SWA(backup_dir=...)` uses on JAX (tests/test_resume.py kills real jobs). Here: the
pair of exactly the asked step comes back (checked against numpy means of the recorded weights),
a save interrupted at any point (the files a SIGKILL leaves: a truncated `.weights.h5`, a JSON
without an index entry, half-written temporary files) leaves the previous complete pairs usable,
and a backup this class did not write -- a TensorFlow checkpoint, another layout, a pair whose
files do not belong together, averages of another model -- is refused with a clear error before
anything is written. Runs on every Keras 3 backend (the class needs only `AveragedWeights` and
h5py); the callback checks are JAX's.
"""

import json
import os

import numpy as np
import pytest

import keras_swa
from keras_swa.backend import IS_KERAS_3, keras
from keras_swa.backup_files import FileStateBackup

pytest.importorskip("h5py")


def _model(units=2):
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])


def _set(model, value):
    """Sets every weight of `model` to `value` and returns NumPy copies of them."""
    out = []
    for v in model.weights:
        array = np.full(tuple(v.shape), value, "float32")
        v.assign(array)
        out.append(array)
    return out


def _averages(averaged):
    return [np.array(a) for a in averaged.averages]


@pytest.fixture
def saved(tmp_path):
    """A backup with the pairs of step 5 (1 capture) and step 9 (2 captures)."""
    model = _model()
    averaged = keras_swa.AveragedWeights(model)
    backup = FileStateBackup(tmp_path, averaged)
    first = _set(model, 1.0)
    averaged.update()
    backup.save(5, {"captures": [[0, 5, 0.1]]})
    second = _set(model, 4.0)
    averaged.update()
    backup.save(9, {"captures": [[0, 5, 0.1], [1, 9, 0.1]]})
    return model, averaged, backup, first, second


def test_restores_exactly_the_pair_of_the_step(saved, tmp_path):
    model, averaged, backup, first, second = saved
    assert backup.steps() == [5, 9]
    # A new process: a new AveragedWeights and backup over the same folder.
    restored = keras_swa.AveragedWeights(model)
    again = FileStateBackup(tmp_path, restored)
    assert again.restore(5) == {"captures": [[0, 5, 0.1]]}
    assert int(restored.n_averaged.numpy()) == 1
    for got, want in zip(_averages(restored), first):
        np.testing.assert_array_equal(got, want)
    assert again.restore(9)["captures"][-1] == [1, 9, 0.1]
    assert int(restored.n_averaged.numpy()) == 2
    for got, a, b in zip(_averages(restored), first, second):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6)  # 2.5, independently
    with pytest.raises(FileNotFoundError, match=r"step 7 .*saved steps: \[5, 9\]"):
        again.restore(7)


def test_keeps_the_last_pairs_and_removes_the_others(tmp_path):
    model = _model()
    averaged = keras_swa.AveragedWeights(model)
    backup = FileStateBackup(tmp_path, averaged, max_to_keep=2)
    for step in (1, 2, 3, 3):  # step 3 saved twice, as after a resume that re-runs an epoch
        averaged.update()
        backup.save(step, {"step": step})
    assert backup.steps() == [2, 3]
    names = sorted(os.listdir(backup.directory))
    assert len(names) == 5, names  # index.json + 2 pairs
    assert FileStateBackup(tmp_path, averaged).restore(3) == {"step": 3}
    assert int(averaged.n_averaged.numpy()) == 4
    backup.delete()
    assert not os.path.exists(backup.directory)


def _leftovers_of_a_killed_save(directory, step, complete_json):
    """The files a save of `step` killed part-way leaves (never named by the index)."""
    stem = f"swa_state-{step}-{'ab' * 16}"
    with open(os.path.join(directory, stem + ".weights.h5"), "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)  # a truncated HDF5 file
    if complete_json:
        with open(os.path.join(directory, stem + ".json"), "w") as f:
            json.dump({"format": "keras_swa.SWA backup", "layout": 1, "step": step,
                       "weights": stem + ".weights.h5", "n_averaged": 3, "state": {}}, f)
    with open(os.path.join(directory, f".index.json.{'cd' * 16}.tmp"), "w") as f:
        f.write('{"format": "keras_swa.SWA backup", "pai')  # a half-written next index
    return stem


@pytest.mark.parametrize("complete_json", [False, True])
def test_a_save_killed_before_the_index_leaves_the_previous_pairs(saved, tmp_path, complete_json):
    model, averaged, backup, first, second = saved
    stem = _leftovers_of_a_killed_save(backup.directory, 13, complete_json)
    # The restarted process sees steps 5 and 9 only, and restores them exactly.
    restored = keras_swa.AveragedWeights(model)
    again = FileStateBackup(tmp_path, restored)
    assert again.steps() == [5, 9]
    with pytest.raises(FileNotFoundError, match="step 13"):
        again.restore(13)
    again.restore(9)
    for got, a, b in zip(_averages(restored), first, second):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6)
    # Its next save completes and removes the leftovers.
    again.save(13, {"captures": []})
    assert again.steps() == [5, 9, 13]
    assert not any(name.startswith((stem, ".")) for name in os.listdir(again.directory))


def test_a_step_saved_again_and_killed_keeps_its_old_pair(saved, tmp_path, monkeypatch):
    model, averaged, backup, first, second = saved
    _set(model, 100.0)
    averaged.update()

    def killed(pairs):
        raise KeyboardInterrupt  # the process dies between the pair and the index

    monkeypatch.setattr(backup, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        backup.save(9, {"captures": "new"})
    restored = keras_swa.AveragedWeights(model)
    assert FileStateBackup(tmp_path, restored).restore(9)["captures"][-1] == [1, 9, 0.1]
    assert int(restored.n_averaged.numpy()) == 2
    for got, a, b in zip(_averages(restored), first, second):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6)


def _index(directory):
    with open(os.path.join(directory, "index.json")) as f:
        return json.load(f)


def test_refuses_a_tensorflow_checkpoint(tmp_path):
    os.makedirs(tmp_path / "keras_swa")
    (tmp_path / "keras_swa" / "checkpoint").write_text('model_checkpoint_path: "swa_state-6"\n')
    with pytest.raises(ValueError, match=r"TensorFlow checkpoint.*Received: backup_dir="):
        FileStateBackup(tmp_path, keras_swa.AveragedWeights(_model()))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layout": 0, "keras_swa_version": "0.1.0"}, r"layout version 0 .*'0\.1\.0'"),
        ({"format": "something else"}, r"not written by keras_swa\.SWA"),
    ],
)
def test_refuses_an_old_or_foreign_index(saved, tmp_path, change, message):
    directory = saved[2].directory
    index = dict(_index(directory), **change)
    with open(os.path.join(directory, "index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=message):
        FileStateBackup(tmp_path, keras_swa.AveragedWeights(_model()))


def test_refuses_an_unreadable_index(saved, tmp_path):
    with open(os.path.join(saved[2].directory, "index.json"), "w") as f:
        f.write('{"format": ')
    with pytest.raises(ValueError, match="index is not readable JSON"):
        FileStateBackup(tmp_path, keras_swa.AveragedWeights(_model()))


def test_refuses_a_pair_whose_files_do_not_belong_together(saved, tmp_path):
    model, averaged, backup, first, second = saved
    index = _index(backup.directory)
    pairs = index["pairs"]
    pairs["5"], pairs["9"] = pairs["9"], pairs["5"]  # each step names the other's pair
    with open(os.path.join(backup.directory, "index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="not the SWA state of step 9"):
        FileStateBackup(tmp_path, averaged).restore(9)
    # The state names the averages of another step (another count): refused, nothing written.
    with open(os.path.join(backup.directory, pairs["9"])) as f:
        state = json.load(f)
    with open(os.path.join(backup.directory, pairs["5"])) as f:
        state["weights"] = json.load(f)["weights"]
    state["step"] = 5
    with open(os.path.join(backup.directory, pairs["9"]), "w") as f:
        json.dump(state, f)
    pairs["5"] = pairs["9"]
    with open(os.path.join(backup.directory, "index.json"), "w") as f:
        json.dump(index, f)
    before = _averages(averaged)
    with pytest.raises(ValueError, match=r"do not belong to its state.*Received: n_averaged="):
        FileStateBackup(tmp_path, averaged).restore(5)
    for got, want in zip(_averages(averaged), before):
        np.testing.assert_array_equal(got, want)


def test_refuses_averages_of_another_model(saved, tmp_path):
    other = keras_swa.AveragedWeights(_model(units=5))
    before = _averages(other)
    with pytest.raises(ValueError, match=r"saved from another model.*shape"):
        FileStateBackup(tmp_path, other).restore(9)
    assert int(other.n_averaged.numpy()) == 0
    for got, want in zip(_averages(other), before):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- the callback


def _fit(model, backup_dir, epochs=3):
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    swa = keras_swa.SWA(start_epoch=1, swa_lr=0.05, backup_dir=str(backup_dir), verbose=0)
    model.fit(x, np.zeros((32, 2), "float32"), batch_size=8, epochs=epochs, verbose=0,
              callbacks=[swa, keras.callbacks.BackupAndRestore(str(backup_dir))])
    return swa


@pytest.mark.skipif(not IS_KERAS_3, reason="Keras 3 chooses the backup by backend")
def test_the_callback_chooses_the_backup_by_backend(tmp_path):
    from keras_swa.backend import backend_name
    from keras_swa.backends.tensorflow_backup import StateBackup

    model = _model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    swa = _fit(model, tmp_path / "backup")
    expected = StateBackup if backend_name() == "tensorflow" else FileStateBackup
    assert type(swa._backup) is expected
    assert not (tmp_path / "backup").exists()  # removed after a finished fit


@pytest.mark.jax_only
def test_the_callback_refuses_a_tensorflow_backup_before_training(tmp_path):
    os.makedirs(tmp_path / "backup" / "keras_swa")
    (tmp_path / "backup" / "keras_swa" / "checkpoint").write_text("")
    model = _model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [np.array(v.numpy()) for v in model.weights]
    with pytest.raises(ValueError, match="TensorFlow checkpoint"):
        _fit(model, tmp_path / "backup")
    for b, v in zip(before, model.weights):
        np.testing.assert_array_equal(b, np.asarray(v.numpy()))


@pytest.mark.skipif(not IS_KERAS_3, reason="Keras 3's BackupAndRestore")
def test_step_backups_resume_the_pair_of_the_restored_step(tmp_path):
    """backup_freq=2 with BackupAndRestore(save_freq=2), a capture every step from step 4: a fit
    stopped at step 11 resumes at step 10 with the mean of the weights of steps 5..10."""
    x = np.random.default_rng(1).normal(size=(32, 3)).astype("float32")
    y = np.zeros((32, 2), "float32")
    model = _model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    backup_dir = str(tmp_path / "backup")
    weights = {}  # optimizer step -> NumPy copies of the weights after it

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            weights[step] = [np.array(v.numpy()) for v in self.model.weights]
            if step == 11:
                raise RuntimeError("stop")

    def callbacks(*extra):
        swa = keras_swa.SWA(start_step=4, cycle_unit="step", swa_lr=0.05,
                            backup_dir=backup_dir, backup_freq=2, verbose=0)
        return swa, [swa, *extra, keras.callbacks.BackupAndRestore(backup_dir, save_freq=2)]

    swa, first = callbacks(Stop())
    with pytest.raises(RuntimeError, match="stop"):
        model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=first)
    assert [c[1] for c in swa.captures] == [5, 6, 7, 8, 9, 10, 11]
    restored = {}

    class Check(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not restored:
                restored["step"] = int(self.model.optimizer.iterations.numpy())
                restored["n"] = int(swa2.averaged.n_averaged.numpy())
                restored["averages"] = [np.array(a) for a in swa2.averaged.averages]

    swa2, second = callbacks()
    second.insert(1, Check())
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=second)
    assert restored["step"] == 10 and restored["n"] == 6
    for i, got in enumerate(restored["averages"]):
        want = np.mean([weights[step][i] for step in range(5, 11)], axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert [c[1] for c in swa2.captures][:6] == [5, 6, 7, 8, 9, 10]
