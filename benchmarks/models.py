"""Models and augmentation for the accuracy benchmark: small CNNs for CPU runs.

All use BatchNormalization (SWA's BN recompute matters only with it) and weight decay written as
an L2 penalty `l2(weight_decay / 2)`, so that the gradient is `weight_decay * w`, exactly torch's
`SGD(weight_decay=...)` that the paper's code uses. `weight_decay_scope="all"` puts it on every
parameter as torch does (BN gamma and beta, biases); `"kernels"` on conv/dense kernels only.
BatchNorm momentum defaults to Keras' 0.99; torch's (and the paper code's) `momentum=0.1` is
Keras' 0.9, which the moving statistics of a short run need to forget their initial values.

- `preresnet`: He et al. 2016 pre-activation blocks (BN-ReLU-conv3x3, BN-ReLU-conv3x3, identity or
  1x1-conv shortcut), three stages of `width`, `2 width`, `4 width` filters (stride 2 between
  stages), then BN-ReLU, global average pooling and a dense classifier. Width 32 with one block
  per stage has about 0.3M parameters.
- `vgg`: two conv3x3-BN-ReLU per stage, three stages of `width`, `2 width`, `4 width` filters with
  max-pooling, global average pooling and a dense classifier.
- `cnn`: a fast net for screening on 2 CPU cores: conv3x3(`width`), then two stages of a
  stride-2 conv3x3 and a conv3x3 (`2 width`, `4 width` filters), each conv followed by BN-ReLU,
  then global average pooling and a dense classifier. Width 16 has about 75k parameters and
  trains an epoch of 7500 Fashion-MNIST images in a few seconds.

CIFAR augmentation is the standard one (the paper's): pad 4 pixels, random 32x32 crop, random
horizontal flip. `augment_crop_flip` does it for a whole batch at once (two gathers, no per-image
map) and, given a seed, statelessly, so that a run's augmentation depends only on its seed, epoch
and batch: what lets a run be forked and continued bit for bit.
"""

import tensorflow as tf

from keras_swa.backend import keras

__all__ = ["MODELS", "WEIGHT_DECAY_SCOPES", "augment_crop_flip", "build_model"]

MODELS = ("preresnet", "vgg", "cnn")
WEIGHT_DECAY_SCOPES = ("kernels", "all")


class _Layers:
    """Builds the layers of one model with its weight decay and BatchNorm settings."""

    def __init__(self, weight_decay, scope, bn_momentum):
        self.l2 = weight_decay / 2.0
        self.all = scope == "all"
        self.bn_momentum = bn_momentum

    def _reg(self, applies=True):
        return keras.regularizers.L2(self.l2) if self.l2 and applies else None

    def conv(self, filters, strides, name, kernel_size=3):
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=self._reg(),
            name=name,
        )

    def bn(self, name):
        return keras.layers.BatchNormalization(
            momentum=self.bn_momentum,
            gamma_regularizer=self._reg(self.all),
            beta_regularizer=self._reg(self.all),
            name=name,
        )

    def dense(self, units, name):
        return keras.layers.Dense(
            units,
            kernel_regularizer=self._reg(),
            bias_regularizer=self._reg(self.all),
            name=name,
        )


def _preact_block(layers, x, filters, strides, name):
    out = layers.bn(f"{name}_bn1")(x)
    out = keras.layers.Activation("relu", name=f"{name}_relu1")(out)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.conv(filters, strides, f"{name}_shortcut", kernel_size=1)(out)
    out = layers.conv(filters, strides, f"{name}_conv1")(out)
    out = layers.bn(f"{name}_bn2")(out)
    out = keras.layers.Activation("relu", name=f"{name}_relu2")(out)
    out = layers.conv(filters, 1, f"{name}_conv2")(out)
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def _conv_bn_relu(layers, x, filters, strides, name):
    x = layers.conv(filters, strides, f"{name}_conv")(x)
    x = layers.bn(f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def build_model(
    name,
    input_shape,
    num_classes,
    width=32,
    blocks_per_stage=1,
    weight_decay=3e-4,
    weight_decay_scope="kernels",
    bn_momentum=0.99,
):
    """Builds an (uncompiled) functional model that outputs logits.

    Args:
        name: `"preresnet"`, `"vgg"` or `"cnn"`.
        input_shape: `(H, W, C)`.
        num_classes: number of classes.
        width: filters of the first stage (the others have 2x and 4x). Defaults to 32.
        blocks_per_stage: pre-activation blocks per stage (`preresnet` only). Defaults to 1.
        weight_decay: torch-style weight decay (L2 gradient `wd * w`); 0 for none.
            Defaults to 3e-4 (the paper's PreResNet value).
        weight_decay_scope: `"kernels"` (conv and dense kernels) or `"all"` (every parameter,
            as torch's `SGD(weight_decay=...)`). Defaults to `"kernels"`.
        bn_momentum: Keras BatchNormalization momentum (torch's 0.1 is Keras' 0.9).
            Defaults to 0.99.

    Returns:
        A `keras.Model`.

    Example:

    ```python
    from benchmarks import models
    model = models.build_model("cnn", (28, 28, 1), 10, width=8, weight_decay_scope="all")
    assert model.output_shape == (None, 10)
    ```
    """
    if name not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}. Received: model={name!r}")
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"`width` must be a positive integer. Received: width={width!r}")
    if not (isinstance(blocks_per_stage, int) and blocks_per_stage >= 1):
        raise ValueError(
            "`blocks_per_stage` must be a positive integer. "
            f"Received: blocks_per_stage={blocks_per_stage!r}"
        )
    if weight_decay_scope not in WEIGHT_DECAY_SCOPES:
        raise ValueError(
            f"`weight_decay_scope` must be one of {WEIGHT_DECAY_SCOPES}. "
            f"Received: weight_decay_scope={weight_decay_scope!r}"
        )
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"`bn_momentum` must be in [0, 1). Received: bn_momentum={bn_momentum!r}")
    layers = _Layers(weight_decay, weight_decay_scope, bn_momentum)
    inputs = keras.Input(input_shape, name="image")
    if name == "preresnet":
        x = layers.conv(width, 1, "stem_conv")(inputs)
        for stage, filters in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _preact_block(layers, x, filters, strides, f"stage{stage + 1}_block{block + 1}")
        x = layers.bn("final_bn")(x)
        x = keras.layers.Activation("relu", name="final_relu")(x)
    elif name == "vgg":
        x = inputs
        for stage, filters in enumerate((width, 2 * width, 4 * width)):
            for i in range(2):
                x = _conv_bn_relu(layers, x, filters, 1, f"stage{stage + 1}_{i + 1}")
            x = keras.layers.MaxPooling2D(name=f"stage{stage + 1}_pool")(x)
    else:
        x = _conv_bn_relu(layers, inputs, width, 1, "stem")
        for stage, filters in enumerate((2 * width, 4 * width)):
            x = _conv_bn_relu(layers, x, filters, 2, f"stage{stage + 1}_down")
            x = _conv_bn_relu(layers, x, filters, 1, f"stage{stage + 1}_conv")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.dense(num_classes, "logits")(x)
    return keras.Model(inputs, outputs, name=f"{name}_w{width}")


def augment_crop_flip(images, labels, pad=4, seed=None):
    """Random crop after zero padding by `pad` pixels and random horizontal flip, per batch.

    Every image of the batch gets its own crop offset and flip, drawn in one go; the crop is two
    batched gathers (rows, then columns), so the cost does not grow with a per-image loop.

    Args:
        images: a float batch `(B, H, W, C)`.
        labels: passed through.
        pad: pixels of zero padding on each side. Defaults to 4.
        seed: `None` (stateful random ops) or a shape-`(2,)` int tensor for stateless ones:
            the same seed gives the same crops and flips.

    Returns:
        `(augmented_images, labels)`.

    Example:

    ```python
    import numpy as np
    from benchmarks import models
    x = np.arange(2 * 4 * 4, dtype="float32").reshape(2, 4, 4, 1)
    a, _ = models.augment_crop_flip(x, None, pad=1, seed=[1, 2])
    b, _ = models.augment_crop_flip(x, None, pad=1, seed=[1, 2])
    assert a.shape == x.shape and np.array_equal(a, b)
    ```
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    if seed is None:
        offsets = tf.random.uniform([batch, 2], 0, 2 * pad + 1, dtype=tf.int32)
        flips = tf.random.uniform([batch]) < 0.5
    else:
        seed = tf.cast(seed, tf.int32)
        offsets = tf.random.stateless_uniform(
            [batch, 2], seed, 0, 2 * pad + 1, dtype=tf.int32
        )
        flips = tf.random.stateless_uniform([batch], seed + tf.constant([0, 1])) < 0.5
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    crops = tf.gather(padded, rows, axis=1, batch_dims=1)
    crops = tf.gather(crops, cols, axis=2, batch_dims=1)
    flipped = tf.where(flips[:, None, None, None], tf.reverse(crops, axis=[2]), crops)
    return flipped, labels
