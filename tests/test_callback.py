"""Tests for the `keras_swa.SWA` callback: captures, learning rates and the end-of-training steps.

Runs on TensorFlow (Keras 3 and tf_keras) and on JAX; tests/test_jax_callback.py adds the
JAX-specific checks.

Every expectation is computed independently: numpy means of weights recorded by a separate callback,
the paper's cyclic formula written out here, numpy BatchNorm statistics of the layer inputs.
"""

import logging
import os
import re
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_swa.backend import IS_KERAS_3, keras, ops
from keras_swa.callback import SWA

N, BATCH = 64, 16  # 4 steps per epoch


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32") + 0.1
    return x, y


def _dense_model(lr=0.05):
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def _bn_model(lr=0.05):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    outputs = keras.layers.Dense(1)(keras.layers.Activation("relu")(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def _lr(model):
    return float(tf.convert_to_tensor(model.optimizer.learning_rate))


class Recorder(keras.callbacks.Callback):
    """Records weights and learning rate at every epoch end, and optionally every step."""

    def __init__(self, per_step=False):
        super().__init__()
        self.epochs, self.steps = [], []
        if per_step:
            self.on_train_batch_end = self._batch_end

    def _snap(self):
        return [v.numpy().astype(np.float64) for v in self.model.trainable_variables]

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((epoch, _lr(self.model), self._snap()))

    def _batch_end(self, batch, logs=None):
        it = int(self.model.optimizer.iterations.numpy())
        self.steps.append((it, _lr(self.model), self._snap()))


def _mean(snaps):
    return [np.mean([s[i] for s in snaps], axis=0) for i in range(len(snaps[0]))]


def _assert_weights(model, expected):
    for v, e in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)


def paper_cyclic_lr(i, a1, a2, c):
    """lr(i) = (1 - t(i)) a1 + t(i) a2, t(i) = (((i - 1) mod c) + 1) / c (Izmailov et al. 2018)."""
    t = (((i - 1) % c) + 1) / c
    return (1 - t) * a1 + t * a2


def test_constant_lr_epoch_captures_equal_numpy_mean():
    x, y = _data()
    model = _dense_model(lr=0.05)
    swa = SWA(start_epoch=2, swa_lr=0.02, verbose=0)
    rec = Recorder()
    history = model.fit(x, y, batch_size=BATCH, epochs=6, callbacks=[swa, rec], verbose=0,
                        shuffle=False)
    captured = [snap for epoch, _, snap in rec.epochs if epoch >= 2]
    assert len(captured) == 4
    assert int(swa.averaged.n_averaged.numpy()) == 4
    _assert_weights(model, _mean(captured))
    lrs = {epoch: lr for epoch, lr, _ in rec.epochs}
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.05)
    for epoch in range(2, 6):
        assert lrs[epoch] == pytest.approx(0.02)
    assert history.history["swa_n"] == [0, 0, 1, 2, 3, 4]
    np.testing.assert_allclose(history.history["learning_rate"], [0.05, 0.05] + [0.02] * 4,
                               rtol=1e-6)
    assert [lr for _, _, lr in swa.captures] == pytest.approx([0.02] * 4)


def test_logged_and_captured_learning_rate_is_the_last_steps_with_a_user_schedule():
    # steps 0..7 (0-based optimizer iterations) use 0.1, later steps 0.01.
    def piecewise(step):
        return 0.1 if step <= 7 else 0.01

    x, y = _data()  # 4 steps per epoch: epochs end at iterations 4, 8, 12, 16
    model = _dense_model()
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([7], [0.1, 0.01])
    model.compile(keras.optimizers.SGD(schedule), "mse")
    swa = SWA(start_epoch=1, swa_lr=None, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=4, callbacks=[swa], verbose=0,
                        shuffle=False)
    steps = [4, 8, 12, 16]
    # The rate the epoch's last step used: schedule(iterations - 1). At iteration 8 that is
    # 0.1, although the next step will use 0.01.
    expected = [piecewise(s - 1) for s in steps]
    assert expected == [0.1, 0.1, 0.01, 0.01]
    np.testing.assert_allclose(history.history["learning_rate"], expected, rtol=1e-6)
    assert [step for _, step, _ in swa.captures] == steps[1:]
    assert [lr for _, _, lr in swa.captures] == pytest.approx(expected[1:])


def test_cyclic_step_schedule_follows_paper_and_captures_at_cycle_ends():
    x, y = _data(1)
    a1, a2, c, start = 0.05, 0.005, 3, 5
    model = _dense_model(lr=0.1)
    swa = SWA(start_step=start, cycle_unit="step", cycle_length=c, swa_lr=a1, swa_lr_min=a2,
              verbose=0)
    rec = Recorder(per_step=True)
    model.fit(x, y, batch_size=BATCH, epochs=5, callbacks=[swa, rec], verbose=0, shuffle=False)
    total = 5 * N // BATCH
    assert [it for it, _, _ in rec.steps] == list(range(1, total + 1))
    for it, lr, _ in rec.steps:
        i = it - start  # SWA step i = 1, 2, ... after `start` plain steps
        expected = 0.1 if i < 1 else paper_cyclic_lr(i, a1, a2, c)
        assert lr == pytest.approx(expected, rel=1e-6), (it, lr, expected)
    capture_steps = [it for it, _, _ in rec.steps if it - start >= 1 and (it - start) % c == 0]
    assert [step for _, step, _ in swa.captures] == capture_steps
    assert [lr for _, _, lr in swa.captures] == pytest.approx([a2] * len(capture_steps))
    _assert_weights(model, _mean([snap for it, _, snap in rec.steps if it in capture_steps]))
    assert int(swa.averaged.n_averaged.numpy()) == len(capture_steps)


def test_cyclic_epoch_cycles():
    x, y = _data(2)
    a1, a2 = 0.04, 0.004
    steps_per_epoch = N // BATCH
    model = _dense_model(lr=0.1)
    swa = SWA(start_epoch=1, cycle_length=2, swa_lr=a1, swa_lr_min=a2, verbose=0)
    rec = Recorder(per_step=True)
    model.fit(x, y, batch_size=BATCH, epochs=5, callbacks=[swa, rec], verbose=0, shuffle=False)
    c = 2 * steps_per_epoch
    for it, lr, _ in rec.steps:
        i = it - steps_per_epoch
        expected = 0.1 if i < 1 else paper_cyclic_lr(i, a1, a2, c)
        assert lr == pytest.approx(expected, rel=1e-6), (it, lr, expected)
    captured = [snap for epoch, _, snap in rec.epochs if epoch in (2, 4)]
    assert [e for e, _, _ in swa.captures] == [2, 4]
    assert [lr for _, _, lr in swa.captures] == pytest.approx([a2, a2])
    _assert_weights(model, _mean(captured))


def test_swa_lr_none_only_averages():
    x, y = _data(3)
    model = _dense_model(lr=0.03)
    swa = SWA(start_epoch=0.5, verbose=0)  # fraction of 4 epochs -> epoch 2
    rec = Recorder()
    model.fit(x, y, batch_size=BATCH, epochs=4, callbacks=[swa, rec], verbose=0)
    assert all(lr == pytest.approx(0.03) for _, lr, _ in rec.epochs)
    _assert_weights(model, _mean([snap for epoch, _, snap in rec.epochs if epoch >= 2]))


def test_batchnorm_recomputed_for_the_averaged_weights():
    x, y = _data(4)
    model = _bn_model()
    bn_batch = 16
    swa = SWA(start_epoch=1, swa_lr=0.02, bn_data=x, bn_batch_size=bn_batch, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=4, callbacks=[swa], verbose=0)
    # Inputs of the BN layer under the final (averaged) weights, computed with numpy; the
    # statistics are the cumulative averages of each batch's mean and biased variance.
    dense = model.get_layer("dense_in")
    kernel, bias = (w.numpy().astype(np.float64) for w in dense.weights)
    h = x.astype(np.float64) @ kernel + bias
    batches = [h[i : i + bn_batch] for i in range(0, N, bn_batch)]
    bn = model.get_layer("bn")
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), np.mean([b.mean(axis=0) for b in batches], axis=0),
        rtol=1e-4, atol=1e-5,
    )
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), np.mean([b.var(axis=0) for b in batches], axis=0),
        rtol=1e-4, atol=1e-5,
    )


def test_batchnorm_model_without_bn_data_fails_before_training():
    x, y = _data()
    model = _bn_model()
    before = [v.numpy().copy() for v in model.variables]
    with pytest.raises(ValueError, match=r"'bn'.*Received: bn_data=None"):
        model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[SWA(verbose=0)], verbose=0)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_no_capture_warns_and_leaves_model_alone():
    x, y = _data()
    model = _dense_model()
    rec = Recorder()
    swa = SWA(start_epoch=5, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[swa, rec], verbose=0)
    messages = " ".join(str(w.message) for w in caught)
    assert "no weights will be averaged" in messages
    assert "captured no weights" in messages
    _assert_weights(model, rec.epochs[-1][2])


def test_early_stopping_finalises_with_what_was_captured():
    x, y = _data(5)
    model = _dense_model(lr=0.0)  # no progress: EarlyStopping stops after `patience` epochs
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=1.0)
    rec = Recorder()
    swa = SWA(start_epoch=0, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=20, callbacks=[swa, rec, stop], verbose=0)
    assert 1 < len(rec.epochs) < 20
    assert int(swa.averaged.n_averaged.numpy()) == len(rec.epochs)
    _assert_weights(model, _mean([snap for _, _, snap in rec.epochs]))


def test_steps_per_execution():
    x, y = _data(6)
    model = _dense_model()
    model.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=2)
    with pytest.raises(ValueError, match="cycle_length=3"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  callbacks=[SWA(cycle_unit="step", cycle_length=3, verbose=0)])
    with pytest.raises(ValueError, match="steps_per_execution=2"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  callbacks=[SWA(swa_lr=0.1, swa_lr_min=0.01, verbose=0)])
    swa = SWA(cycle_unit="step", cycle_length=2, start_step=2, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[swa], verbose=0)
    assert [step for _, step, _ in swa.captures] == [4, 6, 8]


def test_export_at_the_end(tmp_path):
    x, y = _data(7)
    model = _bn_model()
    path = str(tmp_path / "swa_model")
    swa = SWA(start_epoch=1, bn_data=x, export_dir=path, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[swa], verbose=0)
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    out = list(serve(tf.constant(x[:8])).values())[0].numpy()
    np.testing.assert_allclose(out, np.asarray(model(x[:8], training=False)), rtol=1e-5, atol=1e-5)


def test_ema_mode_through_the_callback():
    x, y = _data(8)
    model = _dense_model()
    rec = Recorder()
    swa = SWA(mode="ema", decay=0.5, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=[swa, rec], verbose=0)
    snaps = [snap for _, _, snap in rec.epochs]
    expected = snaps[0]
    for s in snaps[1:]:
        expected = [0.5 * e + 0.5 * v for e, v in zip(expected, s)]
    _assert_weights(model, expected)


def test_ema_warm_up_through_the_callback():
    # tensorflow-addons' dynamic decay: min(decay, (1 + n) / (10 + n)), n = captures so far.
    x, y = _data(8)
    model = _dense_model()
    rec = Recorder()
    swa = SWA(mode="ema", decay=0.9, dynamic_decay=True, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=4, callbacks=[swa, rec], verbose=0)
    snaps = [snap for _, _, snap in rec.epochs]
    expected = snaps[0]
    for n, s in enumerate(snaps[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * v for e, v in zip(expected, s)]
    _assert_weights(model, expected)


def test_custom_avg_fn_through_the_callback():
    x, y = _data(8)
    model = _dense_model()
    rec = Recorder()
    swa = SWA(avg_fn=lambda average, value, n: ops.maximum(average, value), verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=[swa, rec], verbose=0)
    snaps = [snap for _, _, snap in rec.epochs]
    _assert_weights(model, [np.max(np.stack(vs), axis=0) for vs in zip(*snaps)])


def test_optimizer_with_schedule_and_swa_lr_fails_before_training():
    x, y = _data()
    model = _dense_model()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    model.compile(keras.optimizers.SGD(schedule), "mse")
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(TypeError, match="learning-rate schedule"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  callbacks=[SWA(swa_lr=0.01, verbose=0)])
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_epoch_captures_do_not_override_batch_end_hook():
    swa = SWA(start_epoch=3, swa_lr=0.1)
    assert "on_train_batch_end" not in vars(swa)
    assert type(swa).on_train_batch_end is keras.callbacks.Callback.on_train_batch_end
    assert "on_train_batch_end" in vars(SWA(cycle_unit="step"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start_epoch": 1, "start_step": 1, "cycle_unit": "step"}, "start_step=1"),
        ({"start_epoch": 1.5}, "start_epoch=1.5"),
        ({"start_epoch": 0.0}, "start_epoch=0.0"),
        ({"start_epoch": -1}, "start_epoch=-1"),
        ({"start_step": -2, "cycle_unit": "step"}, "start_step=-2"),
        ({"start_step": 3}, "cycle_unit='epoch'"),
        ({"cycle_length": 0}, "cycle_length=0"),
        ({"cycle_length": 1.5}, "cycle_length=1.5"),
        ({"cycle_unit": "batch"}, "cycle_unit='batch'"),
        ({"swa_lr": 0}, "swa_lr=0"),
        ({"swa_lr": -0.1}, "swa_lr=-0.1"),
        ({"swa_lr": 0.01, "swa_lr_min": 0.1}, "swa_lr_min=0.1"),
        ({"swa_lr_min": 0.1}, "swa_lr=None"),
        ({"bn_steps": 0}, "bn_steps=0"),
        ({"mode": "avg"}, "mode='avg'"),
        ({"decay": 0.9}, "mode='swa', decay=0.9"),
        ({"mode": "ema"}, "decay=None"),
        ({"mode": "ema", "decay": 1.0}, "decay=1.0"),
        ({"verbose": 2}, "`verbose` must be 0 or 1. Received: verbose=2"),
        ({"variables": []}, "variables=[]"),
        ({"nonfinite": "warn"}, "nonfinite='warn'"),
        ({"dynamic_decay": True}, "dynamic_decay=True"),
        ({"mode": "ema", "decay": 0.9, "warmup_gamma": 2.0}, "warmup_power=None"),
        ({"avg_fn": 3}, "avg_fn=3"),
        ({"mode": "ema", "decay": 0.9, "avg_fn": max}, "mode='ema', decay=0.9"),
        ({"backup_freq": 0}, "backup_freq=0"),
        ({"swa_validation_freq": 0}, "swa_validation_freq=0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SWA(**kwargs)


class _Diverge(keras.callbacks.Callback):
    """Puts a NaN into the last kernel at the end of epoch `at` (before SWA's capture runs)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            kernel = self.model.trainable_variables[-2]
            value = kernel.numpy()
            value[0, 0] = np.nan
            kernel.assign(value)


def test_nonfinite_capture_raises_with_epoch_and_variable():
    x, y = _data(9)
    model = _dense_model(lr=0.0)
    swa = SWA(verbose=0)
    with pytest.raises(FloatingPointError, match=r"epoch 2 .*kernel"):
        model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=[_Diverge(1), swa], verbose=0)
    assert int(swa.averaged.n_averaged.numpy()) == 1
    assert all(np.isfinite(np.asarray(a)).all() for a in swa.averaged.averages)


def test_nonfinite_capture_skipped():
    x, y = _data(9)
    model = _dense_model(lr=0.0)
    swa = SWA(nonfinite="skip", verbose=0)
    with pytest.warns(UserWarning, match="skipped"):
        model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[_Diverge(0), swa], verbose=0)
    assert int(swa.averaged.n_averaged.numpy()) == 0


def test_unusable_export_dir_fails_before_training(tmp_path):
    x, y = _data()
    model = _dense_model()
    before = [v.numpy().copy() for v in model.variables]
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(FileExistsError, match="export_dir="):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[SWA(export_dir=str(a_file), verbose=0)])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "saved_model.pb").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite_export=True"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[SWA(export_dir=str(existing), verbose=0)])
    assert a_file.read_text() == "keep me"
    assert (existing / "saved_model.pb").read_text() == "old"
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_bad_bn_data_fails_before_training():
    x, y = _data()
    model = _bn_model()
    before = [v.numpy().copy() for v in model.variables]
    for bad, message in [
        (np.zeros((0, 5), "float32"), r"empty.*shape=\(0, 5\)"),
        (np.zeros((8, 7), "float32"), r"shape=\(8, 7\)"),
    ]:
        swa = SWA(start_epoch=0, bn_data=bad, verbose=0)
        with pytest.raises(ValueError, match=message):
            model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[swa], verbose=0)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_validation_of_the_average_leaves_training_bit_identical():
    x, y = _data(10)
    xv, yv = _data(11)

    def run(validate):
        keras.utils.set_random_seed(3)
        model = _bn_model()
        model.compile(keras.optimizers.SGD(0.05), "mse", metrics=["mae"])
        rec = Recorder()
        swa = SWA(start_epoch=1, bn_data=x, bn_batch_size=BATCH, verbose=0,
                  swa_validation_data=(xv, yv) if validate else None)
        history = model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
                            callbacks=[swa, rec])
        return model, rec, history

    plain_model, plain, _ = run(False)
    model, rec, history = run(True)
    for (_, _, a), (_, _, b) in zip(plain.epochs, rec.epochs):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    for u, v in zip(plain_model.variables, model.variables):
        np.testing.assert_array_equal(u.numpy(), v.numpy())
    # The logged value is the final model's (average + recomputed BN) validation loss.
    assert len(history.history["val_swa_loss"]) == 3  # epochs 1..3 have captures
    expected = np.mean((model.predict(xv, verbose=0) - yv) ** 2)
    assert history.history["val_swa_loss"][-1] == pytest.approx(expected, rel=1e-4)
    assert "val_swa_mae" in history.history


def test_swap_averaged_weights_for_model_checkpoint(tmp_path):
    from keras_swa.swap import SwapAveragedWeights

    x, y = _data(12)
    model = _dense_model()
    initial = model.get_weights()
    rec = Recorder()
    swa = SWA(start_epoch=1, verbose=0)

    class Seen(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.weights = []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append([v.numpy().astype(np.float64) for v in self.model.trainable_variables])

    seen = Seen()
    model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
              callbacks=[swa, rec, SwapAveragedWeights(swa), seen])
    # What callbacks after the swap see at epoch e >= 1: the mean of the captures so far.
    for e in range(1, 4):
        expected = _mean([snap for epoch, _, snap in rec.epochs if 1 <= epoch <= e])
        for v, w in zip(seen.weights[e], expected):
            np.testing.assert_allclose(v, w, rtol=1e-5, atol=1e-6)
    # Training itself is untouched: the same trajectory as without the swap callback.
    keras.utils.set_random_seed(1234)
    plain_model = _dense_model()
    plain_model.set_weights(initial)
    plain = Recorder()
    plain_model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
                    callbacks=[SWA(start_epoch=1, verbose=0), plain])
    for (_, _, a), (_, _, b) in zip(plain.epochs, rec.epochs):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    with pytest.raises(TypeError, match="swa="):
        SwapAveragedWeights("not a callback")


def test_swap_with_bn_data_checkpoint_files_hold_the_average(tmp_path):
    # SWA, SwapAveragedWeights(bn_data) and ModelCheckpoint in one fit: each epoch's file holds
    # the numpy mean of the captures so far with numpy BatchNorm statistics for it, and the
    # training trajectory (BN moving statistics included) is bit for bit the one without them.
    from keras_swa.swap import SwapAveragedWeights

    x, y = _data(16)
    model = _bn_model()
    initial = model.get_weights()

    class AllWeights(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs = []

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append([np.array(w, np.float64) for w in self.model.get_weights()])

    rec = AllWeights()
    swa = SWA(start_epoch=1, bn_data=x, verbose=0)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "swa-{epoch}.weights.h5"), save_weights_only=True
    )
    model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
              callbacks=[swa, rec, SwapAveragedWeights(swa, bn_data=x, bn_batch_size=N),
                         checkpoint])
    # get_weights order: dense_in kernel, bias; bn gamma, beta, moving mean, moving variance;
    # dense kernel, bias.
    for epoch in range(4):
        saved = _bn_model()
        saved.load_weights(str(tmp_path / f"swa-{epoch + 1}.weights.h5"))
        got = [np.asarray(w, np.float64) for w in saved.get_weights()]
        if epoch == 0:  # nothing captured yet: the training weights
            for g, e in zip(got, rec.epochs[0]):
                np.testing.assert_array_equal(g, e)
            continue
        mean = [np.mean([rec.epochs[e][i] for e in range(1, epoch + 1)], axis=0)
                for i in range(8)]
        for i in (0, 1, 2, 3, 6, 7):
            np.testing.assert_allclose(got[i], mean[i], rtol=1e-5, atol=1e-6)
        h = x.astype(np.float64) @ mean[0] + mean[1]
        np.testing.assert_allclose(got[4], h.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[5], h.var(axis=0), rtol=1e-5, atol=1e-5)
        assert not np.allclose(got[4], rec.epochs[epoch][4], atol=1e-3)  # BN was recomputed
    keras.utils.set_random_seed(1234)
    plain_model = _bn_model()
    plain_model.set_weights(initial)
    plain = AllWeights()
    plain_model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
                    callbacks=[SWA(start_epoch=1, bn_data=x, verbose=0), plain])
    for a, b in zip(plain.epochs, rec.epochs):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_constant_swa_lr_from_a_start_step():
    x, y = _data(13)
    model = _dense_model(lr=0.1)
    swa = SWA(start_step=6, cycle_unit="step", cycle_length=2, swa_lr=0.01, verbose=0)
    rec = Recorder(per_step=True)
    model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=[swa, rec], verbose=0, shuffle=False)
    for it, lr, _ in rec.steps:
        assert lr == pytest.approx(0.1 if it <= 6 else 0.01), (it, lr)
    assert [step for _, step, _ in swa.captures] == [8, 10, 12]
    _assert_weights(model, _mean([snap for it, _, snap in rec.steps if it in (8, 10, 12)]))


def test_nonfinite_ignore_averages_the_capture_unchecked():
    x, y = _data(9)
    model = _dense_model(lr=0.0)
    swa = SWA(nonfinite="ignore", verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[_Diverge(0), swa], verbose=0)
    # Counted, and the NaN went into the average as it was: no check ran.
    assert int(swa.averaged.n_averaged.numpy()) == 1
    kernel = np.asarray(swa.averaged.averages[-2])
    assert np.isnan(kernel[0, 0])
    assert np.isfinite(np.delete(kernel.ravel(), 0)).all()


# ------------------------------------------------------------------ messages and verbose


class _Marker(keras.callbacks.Callback):
    """Prints a marker at every batch end (listed after SWA, so it runs after SWA's hooks)."""

    def on_train_batch_end(self, batch, logs=None):
        print(f"<batch {int(self.model.optimizer.iterations.numpy())}>")


def test_messages_print_like_keras_epoch_messages(capsys):
    x, y = _data()
    model = _bn_model()
    swa = SWA(start_epoch=1, swa_lr=0.02, bn_data=x, bn_batch_size=BATCH)
    model.fit(x, y, batch_size=BATCH, epochs=3, callbacks=[swa], verbose=0)
    out = capsys.readouterr().out
    # The capture messages start with a line break (ending a progress bar's line) and the
    # epoch, as ModelCheckpoint's "\nEpoch 5: saving model ..." does.
    assert out == (
        "\nEpoch 2: SWA captured the weights (n_averaged=1, learning_rate=0.02).\n"
        "\nEpoch 3: SWA captured the weights (n_averaged=2, learning_rate=0.02).\n"
        "Epoch 3: SWA set the model to the average of 2 captures.\n"
        f"Epoch 3: SWA recomputed the BatchNorm statistics over {N} samples.\n"
    )


def test_step_capture_messages_wait_for_the_epoch_end(capsys):
    x, y = _data()  # 4 steps per epoch
    model = _dense_model()
    swa = SWA(start_step=0, cycle_unit="step", cycle_length=1)
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[swa, _Marker()], verbose=0)
    lines = capsys.readouterr().out.splitlines()
    # Nothing between the batches of an epoch: one line after its last batch.
    assert lines == [
        "<batch 1>", "<batch 2>", "<batch 3>", "<batch 4>",
        "",
        "Epoch 1: SWA captured the weights at 4 steps (1, 2, ..., 4) "
        "(n_averaged=4, learning_rate=0.05).",
        "<batch 5>", "<batch 6>", "<batch 7>", "<batch 8>",
        "",
        "Epoch 2: SWA captured the weights at 4 steps (5, 6, ..., 8) "
        "(n_averaged=8, learning_rate=0.05).",
        "Epoch 2: SWA set the model to the average of 8 captures.",
    ]


def test_verbose_0_is_silent(capsys):
    x, y = _data()
    model = _bn_model()
    swa = SWA(start_epoch=0, bn_data=x, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[swa], verbose=0)
    assert capsys.readouterr().out == ""


@pytest.fixture
def non_interactive_logging():
    config = keras.config if IS_KERAS_3 else keras.utils
    was_enabled = config.is_interactive_logging_enabled()
    config.disable_interactive_logging()
    try:
        yield
    finally:
        if was_enabled:
            config.enable_interactive_logging()


def test_messages_go_to_absl_logging_when_interactive_logging_is_off(
    non_interactive_logging, capsys, caplog
):
    x, y = _data()
    model = _dense_model()
    swa = SWA(start_epoch=1, swa_lr=0.02)
    with caplog.at_level(logging.INFO, logger="absl"):
        model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[swa], verbose=0)
    assert "SWA" not in capsys.readouterr().out
    messages = [r.getMessage() for r in caplog.records if "SWA" in r.getMessage()]
    assert messages == [
        "Epoch 2: SWA captured the weights (n_averaged=1, learning_rate=0.02).",
        "Epoch 2: SWA set the model to the average of 1 captures.",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if "SWA" in r.getMessage())


# ------------------------------------------------------------------ variables=


def _head_model(lr=0.05):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("relu")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def _is_head(variable):
    head_ids = {id(w) for w in _is_head.model.get_layer("head").weights}
    return id(variable) in head_ids


@pytest.mark.parametrize("form", ["list", "predicate"])
def test_variables_average_only_the_selection(form):
    x, y = _data(14)
    model = _head_model()
    _is_head.model = model
    head = model.get_layer("head").trainable_weights
    selection = list(head) if form == "list" else _is_head
    swa = SWA(start_epoch=1, swa_lr=0.02, bn_data=x, bn_batch_size=BATCH, variables=selection,
              verbose=0)
    rec = Recorder()
    model.fit(x, y, batch_size=BATCH, epochs=4, callbacks=[swa, rec], verbose=0, shuffle=False)
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    chosen = [index[id(v)] for v in head]
    assert [id(v) for v in swa.averaged.tracked_variables] == [id(v) for v in head]
    captured = [snap for epoch, _, snap in rec.epochs if epoch >= 1]
    last = rec.epochs[-1][2]
    for i, v in enumerate(model.trainable_variables):
        if i in chosen:
            expected = np.mean([snap[i] for snap in captured], axis=0)
        else:
            expected = last[i]  # the last iterate, untouched by the average
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6)
    # The head's mean differs from its last iterate, so the test tells the two apart.
    assert not np.allclose(last[chosen[0]], np.mean([s[chosen[0]] for s in captured], axis=0))
    # BatchNorm was recomputed (for the model as it ends: last-iterate dense_in).
    kernel, bias = (w.numpy().astype(np.float64) for w in model.get_layer("dense_in").weights)
    h = x.astype(np.float64) @ kernel + bias
    batches = [h[i : i + BATCH] for i in range(0, N, BATCH)]
    np.testing.assert_allclose(
        model.get_layer("bn").moving_mean.numpy(),
        np.mean([b.mean(axis=0) for b in batches], axis=0), rtol=1e-4, atol=1e-5,
    )


def test_variables_subset_with_swap_averaged_weights():
    from keras_swa.swap import SwapAveragedWeights

    x, y = _data(15)
    model = _dense_model()
    head = list(model.layers[-1].trainable_weights)
    swa = SWA(start_epoch=0, variables=head, verbose=0)
    rec = Recorder()
    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
              callbacks=[swa, rec, SwapAveragedWeights(swa)])
    captured = [snap for _, _, snap in rec.epochs]
    np.testing.assert_allclose(head[0].numpy(), np.mean([s[-2] for s in captured], axis=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.trainable_variables[0].numpy(), captured[-1][0],
                               rtol=1e-6, atol=1e-7)


def test_bad_variables():
    x, y = _data()
    model = _dense_model()
    other = _dense_model()
    with pytest.raises(TypeError, match="Received: variables='dense'"):
        SWA(variables="dense")
    with pytest.raises(ValueError, match="include_non_trainable=True"):
        SWA(variables=list(model.trainable_variables), include_non_trainable=True)
    stranger = other.trainable_variables[0]
    with pytest.raises(ValueError, match="is not one of them. Received: variables="):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[SWA(variables=[stranger], verbose=0)])
    with pytest.raises(ValueError, match="twice"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[
            SWA(variables=[model.trainable_variables[0]] * 2, verbose=0)])

    def nothing(variable):
        return False

    with pytest.raises(ValueError, match=r"selected none of the model's 4 trainable variables"
                       r"\. Received: variables=<function"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[SWA(variables=nothing, verbose=0)])
