"""A run forked from a snapshot of another equals the unforked run, bit for bit.

The accuracy benchmark trains the SGD and SWA arms' common trunk once (benchmarks/training.py).
That is only sound if continuing from a snapshot changes nothing: with op determinism on, the
weights, BN statistics, optimizer state and the SWA averages of a forked run are compared with an
unforked run's by exact equality.
"""

import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

import keras_swa  # noqa: E402
from benchmarks import training  # noqa: E402

pytestmark = pytest.mark.tf_only("the benchmark's runs are TensorFlow tf.data pipelines")


@pytest.fixture(scope="module", autouse=True)
def _deterministic():
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


def _data():
    rng = np.random.RandomState(3)
    x = rng.rand(96, 10, 10, 1).astype("float32")
    y = (x[:, 2:5, 2:5, 0].mean(axis=(1, 2)) > 0.5).astype("int64")
    return x, y


SPEC = training.RunSpec(model="cnn", width=2, num_classes=2, batch_size=32, lr_init=0.05,
                        weight_decay=1e-3, augment_pad=1)


def _equal(a, b):
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def test_forked_sgd_run_equals_the_unforked_one_bit_for_bit():
    x, y = _data()
    whole = training.Run(SPEC, x, y, seed=5, total_epochs=4)
    whole.fit(0, 4)
    trunk = training.Run(SPEC, x, y, seed=5, total_epochs=4)
    trunk.fit(0, 2)
    fork = training.Run(SPEC, x, y, seed=5, total_epochs=4)
    fork.restore(trunk.snapshot())
    fork.fit(2, 4)
    assert _equal(whole.model.get_weights(), fork.model.get_weights())
    assert _equal([v.numpy() for v in whole.optimizer.variables],
                  [v.numpy() for v in fork.optimizer.variables])
    assert whole.history == fork.history
    # The fork is not trivially equal: a different seed gives different weights.
    other = training.Run(SPEC, x, y, seed=6, total_epochs=4)
    other.fit(0, 4)
    assert not _equal(whole.model.get_weights(), other.model.get_weights())


def test_forked_swa_arm_equals_the_unforked_one_bit_for_bit():
    x, y = _data()
    steps = 3  # 96 images, batch 32

    def arm():
        schedule = keras_swa.schedules.PaperSchedule(0.05, 0.025, swa_start=4 * steps)
        return training.Run(SPEC, x, y, seed=2, total_epochs=5, schedule=schedule)

    def swa():
        return keras_swa.SWA(start_epoch=3, bn_data=x, bn_batch_size=32, verbose=0)

    whole, whole_swa = arm(), swa()
    whole.fit(0, 5, [whole_swa])
    # The trunk is the SGD run (a different schedule), up to epoch 2 where both are still flat.
    trunk = training.Run(SPEC, x, y, seed=2, total_epochs=5)
    trunk.fit(0, 2)
    fork, fork_swa = arm(), swa()
    fork.restore(trunk.snapshot())
    fork.fit(2, 5, [fork_swa])
    assert int(fork_swa.averaged.n_averaged.numpy()) == 2
    assert _equal(whole.model.get_weights(), fork.model.get_weights())


def test_restore_refuses_another_optimizer_and_fit_another_epoch():
    x, y = _data()
    run = training.Run(SPEC, x, y, seed=0, total_epochs=2)
    with pytest.raises(ValueError, match="Received: start=1"):
        run.fit(1, 2)
    snapshot = run.snapshot()
    snapshot["optimizer"] = snapshot["optimizer"][:1]
    with pytest.raises(ValueError, match="different optimizer"):
        run.restore(snapshot)


def test_epoch_order_and_augmentation_depend_only_on_seed_epoch_batch():
    from benchmarks import models

    a = training.epoch_order(1, 7, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, training.epoch_order(1, 7, 50))
    assert not np.array_equal(a, training.epoch_order(1, 8, 50))
    x = np.random.RandomState(0).rand(8, 6, 6, 1).astype("float32")
    one, _ = models.augment_crop_flip(x, None, pad=2, seed=[4, 1])
    two, _ = models.augment_crop_flip(x, None, pad=2, seed=[4, 1])
    three, _ = models.augment_crop_flip(x, None, pad=2, seed=[4, 2])
    assert np.array_equal(one, two) and not np.array_equal(one, three)


def test_cross_entropy_matches_the_formula():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    expected = -(np.log(np.exp(2) / (np.exp(2) + 1)) + np.log(np.e / (1 + np.e))) / 2
    assert training.cross_entropy(logits, [0, 1]) == pytest.approx(expected, rel=1e-12)
