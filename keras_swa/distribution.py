"""Which distribution keras_swa's state and passes run under.

On TensorFlow (tf_keras included), one rule for `AveragedWeights` (and so `SWA`, `SWAG`) and
`update_bn`: the `tf.distribute` strategy in scope, else the one the model was built under
(`model.distribute_strategy`), else the default one. ParameterServerStrategy is refused: its
workers update the variables asynchronously, so there is no one set of weights per step to
average and no one pass whose statistics could be combined.

On Keras 3's JAX backend the distribution is `keras.distribution.distribution()`, the one set
with `keras.distribution.set_distribution` or a `Distribution.scope()`. None, or a
`keras.distribution.DataParallel` in one process, is supported by `AveragedWeights`, `SWA`,
`update_bn`, `SWAG` and `FGE` (`check_keras_distribution`): the variables are replicated and the
batch is sharded, so the averages and statistics are replicated like the variables and
`update_bn`'s statistics are reduced over the whole batch by XLA. Anything else (`ModelParallel`,
several processes) is refused until it is tested.
"""

from keras_swa import backend
from keras_swa.backend import keras
from keras_swa.lazy_tensorflow import tf

__all__ = [
    "check_keras_distribution",
    "check_strategy",
    "find_strategy",
    "is_chief",
]


def find_strategy(model_or_variables):
    """The strategy in scope, else the one the model was built under, else the default one."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    strategy = getattr(model_or_variables, "distribute_strategy", None)
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """Whether this process writes what all workers computed together (SavedModel, backup).

    The task TensorFlow itself checkpoints from (`strategy.extended.should_checkpoint`): the
    "chief" task, or worker 0 of a cluster without one; every process of any other strategy.
    """
    return bool(strategy.extended.should_checkpoint)


def check_strategy(strategy, what):
    """Raises a clear `ValueError` for ParameterServerStrategy, naming `what` refuses it."""
    parameter_server = tuple(
        cls
        for cls in (
            getattr(tf.distribute.experimental, "ParameterServerStrategy", None),
            getattr(tf.compat.v1.distribute.experimental, "ParameterServerStrategy", None),
        )
        if cls is not None
    )
    if isinstance(strategy, parameter_server):
        raise ValueError(
            f"{what} does not support ParameterServerStrategy: its workers update the "
            "variables asynchronously, so there is no one set of weights per step to average "
            "and no one BatchNorm pass to combine. Use MirroredStrategy or "
            f"MultiWorkerMirroredStrategy. Received: strategy={type(strategy).__name__}"
        )
    return strategy


def check_keras_distribution(what):
    """The `keras.distribution` in effect (`None` or a `DataParallel`), else a clear error.

    Args:
        what: the entry point, named in the error (e.g. `"keras_swa.update_bn"`).

    Raises:
        NotImplementedError: for a distribution other than `DataParallel` (its variables may
            be sharded: not tested), or a `DataParallel` over several processes (each process
            holds only its share of the data: not tested).
    """
    current = keras.distribution.distribution()
    if current is None:
        return None
    if not isinstance(current, keras.distribution.DataParallel):
        raise NotImplementedError(
            f"{what} on the 'jax' Keras backend supports keras.distribution.DataParallel "
            "(replicated variables, sharded batch) and no distribution; other layouts have not "
            "been tested. Unset it (keras.distribution.set_distribution(None)) or use "
            f"DataParallel. Received: distribution={type(current).__name__}"
        )
    import jax

    if jax.process_count() > 1:
        raise NotImplementedError(
            f"{what} supports keras.distribution.DataParallel within one process; several "
            "processes (keras.distribution.initialize) have not been tested. "
            f"Received: process_count={jax.process_count()}"
        )
    return current
