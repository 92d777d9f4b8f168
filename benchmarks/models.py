"""Models and augmentation for the accuracy benchmark: a pre-activation ResNet and a VGG-style net.

Both use BatchNormalization (SWA's BN recompute matters only with it) and an L2 penalty on the
conv/dense kernels written as `kernel_regularizer=l2(weight_decay / 2)`, so that the gradient is
`weight_decay * w`, exactly torch's `SGD(weight_decay=...)` that the paper's code uses.

- `preresnet`: He et al. 2016 pre-activation blocks (BN-ReLU-conv3x3, BN-ReLU-conv3x3, identity or
  1x1-conv shortcut), three stages of `width`, `2 width`, `4 width` filters (stride 2 between
  stages), then BN-ReLU, global average pooling and a dense classifier. Width 32 with one block
  per stage has about 0.3M parameters.
- `vgg`: two conv3x3-BN-ReLU per stage, three stages of `width`, `2 width`, `4 width` filters with
  max-pooling, global average pooling and a dense classifier.

CIFAR augmentation is the standard one (the paper's): pad 4 pixels, random 32x32 crop, random
horizontal flip.
"""

import tensorflow as tf

from keras_swa.backend import keras

__all__ = ["MODELS", "augment_crop_flip", "build_model"]

MODELS = ("preresnet", "vgg")


def _conv(filters, strides, l2, name):
    return keras.layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
        name=name,
    )


def _preact_block(x, filters, strides, l2, name):
    out = keras.layers.BatchNormalization(name=f"{name}_bn1")(x)
    out = keras.layers.Activation("relu", name=f"{name}_relu1")(out)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(
            filters,
            1,
            strides=strides,
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
            name=f"{name}_shortcut",
        )(out)
    out = _conv(filters, strides, l2, f"{name}_conv1")(out)
    out = keras.layers.BatchNormalization(name=f"{name}_bn2")(out)
    out = keras.layers.Activation("relu", name=f"{name}_relu2")(out)
    out = _conv(filters, 1, l2, f"{name}_conv2")(out)
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def _head(x, num_classes, l2):
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(
        num_classes,
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
        name="logits",
    )(x)


def build_model(name, input_shape, num_classes, width=32, blocks_per_stage=1, weight_decay=3e-4):
    """Builds an (uncompiled) functional model that outputs logits.

    Args:
        name: `"preresnet"` or `"vgg"`.
        input_shape: `(H, W, C)`.
        num_classes: number of classes.
        width: filters of the first stage (the others have 2x and 4x). Defaults to 32.
        blocks_per_stage: pre-activation blocks per stage (`preresnet` only). Defaults to 1.
        weight_decay: torch-style weight decay of the kernels (L2 gradient `wd * w`); 0 for none.
            Defaults to 3e-4 (the paper's PreResNet value).

    Returns:
        A `keras.Model`.
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
    l2 = weight_decay / 2.0
    inputs = keras.Input(input_shape, name="image")
    if name == "preresnet":
        x = _conv(width, 1, l2, "stem_conv")(inputs)
        for stage, filters in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _preact_block(x, filters, strides, l2, f"stage{stage + 1}_block{block + 1}")
        x = keras.layers.BatchNormalization(name="final_bn")(x)
        x = keras.layers.Activation("relu", name="final_relu")(x)
    else:
        x = inputs
        for stage, filters in enumerate((width, 2 * width, 4 * width)):
            for i in range(2):
                x = _conv(filters, 1, l2, f"stage{stage + 1}_conv{i + 1}")(x)
                x = keras.layers.BatchNormalization(name=f"stage{stage + 1}_bn{i + 1}")(x)
                x = keras.layers.Activation("relu", name=f"stage{stage + 1}_relu{i + 1}")(x)
            x = keras.layers.MaxPooling2D(name=f"stage{stage + 1}_pool")(x)
    outputs = _head(x, num_classes, l2)
    return keras.Model(inputs, outputs, name=f"{name}_w{width}")


def augment_crop_flip(images, labels, pad=4):
    """Random crop after zero padding by `pad` pixels, and random horizontal flip (a tf.data map).

    Args:
        images: a float batch `(B, H, W, C)`.
        labels: passed through.
        pad: pixels of zero padding on each side. Defaults to 4.

    Returns:
        `(augmented_images, labels)`.
    """
    shape = tf.shape(images)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    crops = tf.map_fn(
        lambda img: tf.image.random_crop(img, [shape[1], shape[2], shape[3]]),
        padded,
        fn_output_signature=images.dtype,
    )
    return tf.image.random_flip_left_right(crops), labels
