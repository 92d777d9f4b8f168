"""keras_swa: Stochastic Weight Averaging for Keras and TensorFlow.

Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018,
arXiv 1803.05407. The public names:

- `SWA`: the `model.fit` callback.
- `AveragedWeights`: the averaging state for custom training loops.
- `update_bn`: recompute BatchNorm statistics for the averaged weights.
- `average_checkpoints`: the average of saved checkpoints, after training.
- `export_saved_model`: write a SavedModel that serves without keras_swa.
- `SwapAveragedWeights`: the average in the model at epoch ends (for `ModelCheckpoint`).
- `SWAG`: SWA-Gaussian uncertainty (Maddox et al. 2019) on the same captures.
- `FGE`: fast geometric ensembles (Garipov et al. 2018) of the cycle-minimum snapshots.
- `schedules`: SWA learning-rate schedules (`Cyclic`, `Constant`, `Anneal`, `PaperSchedule`,
  `Triangular`).
"""

from keras_swa import schedules
from keras_swa.averaged_weights import AveragedWeights
from keras_swa.batch_norm import update_bn
from keras_swa.callback import SWA
from keras_swa.checkpoints import average_checkpoints
from keras_swa.export import export_saved_model
from keras_swa.fge import FGE
from keras_swa.swag import SWAG
from keras_swa.swap import SwapAveragedWeights
from keras_swa.version import __version__

__all__ = [
    "AveragedWeights",
    "FGE",
    "SWA",
    "SWAG",
    "SwapAveragedWeights",
    "__version__",
    "average_checkpoints",
    "export_saved_model",
    "schedules",
    "update_bn",
]
