"""Where each average lives: its own variable, or a slice of one flat variable for small ones.

A compiled update writes every average it holds, and on XLA-CPU each written buffer costs one
kernel with a fixed launch cost (measured ~15 us). ResNet-50 has 162 trainable tensors of under
16,384 floats (BatchNorm scales and offsets, 0.4% of its weights) which, one kernel each, cost
~2.5 ms, a quarter of the memory-bound time of the whole update. `Layout` therefore keeps the
average of every variable smaller than `pack_below` floats in ONE flat fp32 variable (one kernel
updates all of them) and gives every larger variable an average of its own.
"""

import numpy as np

from keras_swa.lazy_tensorflow import tf

__all__ = ["Layout", "PACK_BELOW"]

# Variables with fewer floats than this share one flat average (see the module docstring).
PACK_BELOW = 16384


class Layout:
    """Which tracked variables have their own average and where the small ones are packed.

    Args:
        shapes: the shapes of the tracked variables, in order.
        pack_below: variables with fewer elements than this are packed; 0 packs none.

    Example:

    >>> layout = Layout([(3, 4), (5,), (200, 200)], pack_below=100)
    >>> layout.own, layout.packed, layout.packed_size
    ([2], [0, 1], 17)
    >>> layout.offsets
    [0, 12]
    """

    def __init__(self, shapes, pack_below=PACK_BELOW):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.own = [i for i, n in enumerate(self.sizes) if n >= pack_below]
        self.packed = [i for i, n in enumerate(self.sizes) if n < pack_below]
        if len(self.packed) < 2:  # packing one variable gains nothing
            self.own, self.packed = list(range(len(self.shapes))), []
        self.offsets = np.cumsum([0] + [self.sizes[i] for i in self.packed])[:-1].tolist()
        self.packed_size = int(sum(self.sizes[i] for i in self.packed))

    def pack(self, values):
        """One flat float32 tensor of the packed variables' `values` (all tracked values given)."""
        return tf.concat(
            [tf.reshape(tf.cast(values[i], tf.float32), [-1]) for i in self.packed], 0
        )

    def unpack(self, own_values, packed_value):
        """The value of every tracked variable, in order, from the own and packed storage."""
        out = [None] * len(self.shapes)
        for i, value in zip(self.own, own_values):
            out[i] = value
        for i, offset in zip(self.packed, self.offsets):
            out[i] = tf.reshape(packed_value[offset:offset + self.sizes[i]], self.shapes[i])
        return out
