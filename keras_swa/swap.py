"""`SwapAveragedWeights`: the SWA average in the model at epoch ends, e.g. for `ModelCheckpoint`.

Keras' `SwapEMAWeights` does this for the optimizer's EMA; this callback does it for the average
that a `keras_swa.SWA` callback in the same `fit` keeps. Put it after `SWA` and before the
callbacks that should see the averaged model (`ModelCheckpoint`, `BackupAndRestore` must NOT be
among them: it must back up the training weights). At each epoch end (once something has been
captured) it saves every model variable, writes the averages in and, with `bn_data`, recomputes
the BatchNorm statistics for them; at the next epoch begin it restores every variable exactly, so
training continues as if nothing had happened.
"""

from keras_swa import backend, model_variables
from keras_swa.backend import keras
from keras_swa.batch_norm import update_bn

__all__ = ["SwapAveragedWeights"]


class SwapAveragedWeights(keras.callbacks.Callback):
    """Puts the SWA average into the model at every epoch end, and takes it out again.

    Args:
        swa: the `keras_swa.SWA` callback of the same `fit` (listed before this one).
        bn_data: if given, BatchNorm statistics are recomputed for the averaged weights after
            the swap (one `update_bn` pass per epoch); otherwise the model keeps the training
            statistics while swapped. Defaults to `None`.
        bn_batch_size: batch size for array `bn_data`. Defaults to `None` (update_bn's).

    Example:

    ```python
    swa = keras_swa.SWA(start_epoch=10, swa_lr=0.01, bn_data=x)
    model.fit(x, y, epochs=20, callbacks=[
        swa,
        keras_swa.SwapAveragedWeights(swa, bn_data=x),
        keras.callbacks.ModelCheckpoint("swa-{epoch}.keras"),  # holds the averaged model
    ])
    ```
    """

    def __init__(self, swa, bn_data=None, bn_batch_size=None):
        backend.require_backend("SwapAveragedWeights")
        super().__init__()
        if not hasattr(swa, "averaged") or not isinstance(swa, keras.callbacks.Callback):
            raise TypeError(
                "`swa` must be the keras_swa.SWA callback of the same fit. "
                f"Received: swa={swa!r}"
            )
        self.swa = swa
        self.bn_data = bn_data
        self.bn_batch_size = bn_batch_size
        self._backup = None

    def on_epoch_end(self, epoch, logs=None):
        averaged = self.swa.averaged
        if averaged is None or int(averaged.n_averaged.numpy()) == 0:
            return
        model_variables.sync(self.model)
        self._backup = model_variables.copy_values(self.model.variables)
        averaged.assign_to()  # the variables SWA tracks: all, or those `variables=` chose
        if self.bn_data is not None:
            update_bn(self.model, self.bn_data, batch_size=self.bn_batch_size, verbose=0)

    def on_epoch_begin(self, epoch, logs=None):
        if self._backup is not None:
            model_variables.assign_values(self.model.variables, self._backup)
            self._backup = None

    def on_train_end(self, logs=None):
        # The SWA callback (earlier in the list) has just written the final average and its
        # BatchNorm statistics into the model: keep them, drop the training weights.
        self._backup = None
