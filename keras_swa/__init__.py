"""keras_swa: Stochastic Weight Averaging for Keras and TensorFlow.

Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018,
arXiv 1803.05407. The public names:

- `SWA`: the `model.fit` callback.
- `AveragedWeights`: the averaging state for custom training loops.
- `update_bn`: recompute BatchNorm statistics for the averaged weights.
- `export_saved_model`: write a SavedModel that serves without keras_swa.
- `SwapAveragedWeights`: the average in the model at epoch ends (for `ModelCheckpoint`).
- `schedules`: SWA learning-rate schedules (`Cyclic`, `Constant`, `Anneal`, `PaperSchedule`,
  `Triangular`).
"""

from keras_swa import schedules
from keras_swa.averaged_weights import AveragedWeights
from keras_swa.batch_norm import update_bn
from keras_swa.callback import SWA
from keras_swa.export import export_saved_model
from keras_swa.swap import SwapAveragedWeights
from keras_swa.version import __version__

__all__ = [
    "AveragedWeights",
    "SWA",
    "SwapAveragedWeights",
    "__version__",
    "export_saved_model",
    "schedules",
    "update_bn",
]
