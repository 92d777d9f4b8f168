"""The `tf.Variable`s that hold keras_swa's state on TensorFlow (averages, statistics, counts).

They are non-trainable, so no optimizer touches them, and under a `tf.distribute` strategy they
are mirrored and written once per device (`ON_WRITE`, `ONLY_FIRST_REPLICA`): each device updates
its own copy from its own replica of the weights inside `strategy.extended.update`, and a
checkpoint saves one copy. Created as attributes of a `tf.Module`, they are what
`tf.train.Checkpoint` carries.
"""

from keras_swa.lazy_tensorflow import tf

__all__ = ["state_variable"]


def state_variable(initial, name):
    """A non-trainable variable, mirrored and written once per device under a strategy.

    Args:
        initial: the initial value (a tensor or anything `tf.Variable` accepts).
        name: the variable's name.

    Example:

    >>> import tensorflow as tf
    >>> count = state_variable(tf.constant(0, tf.int64), "n_averaged")
    >>> int(count.assign_add(1))
    1
    """
    return tf.Variable(
        initial,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )
