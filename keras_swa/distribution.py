"""Which `tf.distribute` strategy keras_swa's state and passes run under.

One rule for `AveragedWeights` (and so `SWA`, `SWAG`) and `update_bn`: the strategy in scope,
else the one the model was built under (`model.distribute_strategy`), else the default one.
ParameterServerStrategy is refused: its workers update the variables asynchronously, so there is
no one set of weights per step to average and no one pass whose statistics could be combined.
"""

import tensorflow as tf

__all__ = ["check_strategy", "find_strategy"]


def find_strategy(model_or_variables):
    """The strategy in scope, else the one the model was built under, else the default one."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    strategy = getattr(model_or_variables, "distribute_strategy", None)
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    return tf.distribute.get_strategy()


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
