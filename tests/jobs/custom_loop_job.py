"""A deterministic custom-loop SWA job for the crash-and-resume tests (run as a subprocess).

    python tests/jobs/custom_loop_job.py WORK_DIR [--kill] [--legacy]

Trains with `optimizer.apply_gradients`, captures into `AveragedWeights` at each epoch end from
epoch 2 on, and checkpoints model, optimizer, averages and the epoch with one
`tf.train.CheckpointManager` after every epoch. `--kill` SIGKILLs the process in the middle of
epoch 3 (after a capture-free checkpoint gap). Writes WORK_DIR/result.npz at the end.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--legacy" in sys.argv:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_swa.averaged_weights import AveragedWeights  # noqa: E402
from keras_swa.backend import keras  # noqa: E402
from keras_swa.batch_norm import update_bn  # noqa: E402


def main():
    work = sys.argv[1]
    kill = "--kill" in sys.argv
    keras.utils.set_random_seed(11)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8),
                              keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    averaged = AveragedWeights(model)
    epoch = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, swa=averaged, epoch=epoch)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(work, "ckpt"), max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    while int(epoch.numpy()) < 6:
        e = int(epoch.numpy())
        for i, (xb, yb) in enumerate(dataset):
            train_step(xb, yb)
            if kill and e == 3 and i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        if e >= 2:
            averaged.update()
        epoch.assign_add(1)
        manager.save()
    averaged.assign_to(model)
    update_bn(model, x, batch_size=32, verbose=0)
    np.savez(os.path.join(work, "result.npz"), n=int(averaged.n_averaged.numpy()),
             *[v.numpy() for v in model.variables])


if __name__ == "__main__":
    main()
