"""A deterministic SWA training job for the crash-and-resume tests (run as a subprocess).

    python tests/jobs/resume_job.py WORK_DIR [--kill WHERE] [--legacy]

Trains a small BatchNorm model with keras_swa.SWA + BackupAndRestore (both using WORK_DIR/backup),
exports to WORK_DIR/model (on backends where `export_dir` runs) and writes the final weights and
SWA count to WORK_DIR/result.npz.
`--kill` makes the process SIGKILL itself at one point: `mid_epoch` (epoch 3, batch 2),
`after_capture` (end of epoch 3, after SWA captured and saved, before BackupAndRestore saved),
`bn_pass` (inside the final BatchNorm pass), `export` (while the SavedModel is being written).
The Keras backend is the environment's (`KERAS_BACKEND`), as for any Keras program.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--legacy" in sys.argv:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_swa.callback as swa_callback  # noqa: E402
from keras_swa.backend import SUPPORTED_ARGUMENT_BACKENDS, backend_name, keras  # noqa: E402


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(keras.callbacks.Callback):
    def __init__(self, where):
        super().__init__()
        self.where = where
        if where == "mid_epoch":
            self.on_train_batch_end = self._batch_end

    def _batch_end(self, batch, logs=None):
        if self._epoch == 3 and batch == 2:
            _die()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.where == "after_capture" and epoch == 3:
            _die()


def main():
    work = sys.argv[1]
    kill = sys.argv[sys.argv.index("--kill") + 1] if "--kill" in sys.argv else None
    keras.utils.set_random_seed(7)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")

    if kill == "bn_pass":
        original = swa_callback.update_bn

        def dying_update_bn(*args, **kwargs):
            original(*args, **kwargs)
            _die()

        swa_callback.update_bn = dying_update_bn
    if kill == "export":
        original_export = swa_callback.export_saved_model

        def dying_export(model, path, **kwargs):
            original_export(model, path + ".partial", **kwargs)  # work was done, then killed
            _die()

        swa_callback.export_saved_model = dying_export

    inputs = keras.Input((6,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Activation("tanh")(h)))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    backup = os.path.join(work, "backup")
    # Export where the backend runs it (the job also runs on JAX, where `export_dir` may not).
    exports = backend_name() in SUPPORTED_ARGUMENT_BACKENDS[("SWA", "export_dir")]
    callbacks = [
        swa_callback.SWA(
            start_epoch=2, swa_lr=0.02, bn_data=x, bn_batch_size=32,
            export_dir=os.path.join(work, "model") if exports else None,
            backup_dir=backup, verbose=0,
        ),
    ]
    if kill in ("mid_epoch", "after_capture"):
        callbacks.append(KillAt(kill))
    callbacks.append(keras.callbacks.BackupAndRestore(backup))
    model.fit(x, y, batch_size=16, epochs=6, shuffle=False, callbacks=callbacks, verbose=0)
    swa = callbacks[0]
    np.savez(
        os.path.join(work, "result.npz"),
        n=int(swa.averaged.n_averaged.numpy()),
        captures=np.array([c[1] for c in swa.captures]),
        *[v.numpy() for v in model.variables],
    )


if __name__ == "__main__":
    main()
