"""A worker process for tests/test_multi_worker_resume.py: SWA + BackupAndRestore on 2 workers.

Usage (TF_CONFIG set by the test; run with TF_USE_LEGACY_KERAS=1):

    python tests/workers/resume_worker.py OUT_DIR [--kill-at EPOCH:BATCH]

Trains a linear tf_keras model with `model.fit` under MultiWorkerMirroredStrategy, with
`keras_swa.SWA(backup_dir=OUT_DIR/backup)` before `keras.callbacks.BackupAndRestore` on the same
directory, and exports the SWA model to OUT_DIR/export/model. With `--kill-at`, worker 1 SIGKILLs itself at
the end of that (0-based) batch of that epoch; the test then kills worker 0 too and restarts both
without the flag. Each worker that finishes writes `result_<task>.npz` into OUT_DIR: the SWA count,
the optimizer steps of the captures, the averages, the model's final weights and the epochs that
this process trained.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from swa_worker import GLOBAL_BATCH, data, linear_fit_model, task  # noqa: E402

EPOCHS = 4
START_EPOCH = 1
SWA_LR = 0.02


def main(out_dir, kill_at=None):
    from keras_swa import SWA
    from keras_swa.backend import IS_KERAS_3, keras

    assert not IS_KERAS_3, "this worker runs tf_keras (TF_USE_LEGACY_KERAS=1)"
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = data()
    model = linear_fit_model(keras, strategy)
    backup_dir = os.path.join(out_dir, "backup")
    swa = SWA(
        start_epoch=START_EPOCH,
        swa_lr=SWA_LR,
        export_dir=os.path.join(out_dir, "export", "model"),
        backup_dir=backup_dir,
    )
    callbacks = [swa]
    if kill_at is not None and task() == "worker1":
        callbacks.append(_kill_at(keras, *kill_at))
    callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
    epochs_run = []  # which epochs this process trained (a resumed run skips the done ones)
    callbacks.append(
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, _: epochs_run.append(epoch))
    )
    model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
        callbacks=callbacks,
    )
    np.savez(
        os.path.join(out_dir, f"result_{task()}.npz"),
        n_averaged=int(swa.averaged.n_averaged.numpy()),
        capture_steps=np.array([c[1] for c in swa.captures]),
        epochs_run=np.array(epochs_run),
        weights=np.array([np.asarray(v) for v in model.trainable_variables], dtype=object),
        averages=np.array([np.asarray(a) for a in swa.averaged.averages], dtype=object),
    )


def _kill_at(keras, epoch, batch):
    """A callback that SIGKILLs this process at the end of batch `batch` of epoch `epoch`."""

    class KillAt(keras.callbacks.Callback):
        def on_epoch_begin(self, current, logs=None):
            self.current = current

        def on_train_batch_end(self, current, logs=None):
            if self.current == epoch and current == batch:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAt()


if __name__ == "__main__":
    kill = None
    if "--kill-at" in sys.argv:
        kill = tuple(int(v) for v in sys.argv[sys.argv.index("--kill-at") + 1].split(":"))
    main(sys.argv[1], kill)
