"""The CIFAR networks of the SWA paper, in Keras 3, for the paper presets (`benchmarks/presets.py`).

Izmailov, Podoprikhin, Garipov, Vetrov and Wilson, "Averaging Weights Leads to Wider Optima and
Better Generalization", UAI 2018 (arXiv:1803.05407). The architectures follow the paper's code,
github.com/timgaripov/swa, folder `models/`, layer for layer (same convolutions, biases or not,
BatchNorm placement, shortcuts, pooling and classifier, so the same parameter counts):

- `vgg16_bn` (`models/vgg.py`, `VGG16BN`): VGG-16 (Simonyan and Zisserman 2015) with BatchNorm,
  conv3x3(+bias)-BN-ReLU blocks with configuration
  [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M] (M: 2x2 max-pool),
  then Dropout(0.5), Dense(512), ReLU, Dropout(0.5), Dense(512), ReLU, Dense(num_classes).
  About 15.0M parameters. (The paper code's README reproduces Table 1 with `--model=VGG16`, the
  same net without BatchNorm; these presets use the BatchNorm variant.)
- `preresnet110` and `preresnet164` (`models/preresnet.py`): pre-activation ResNets (He et al.
  2016), three stages of 16, 32, 64 planes of bottleneck blocks (BN-ReLU-conv1x1,
  BN-ReLU-conv3x3, BN-ReLU-conv1x1 to 4x planes): the paper code uses bottlenecks for every
  depth >= 44, so depth 110 has (110 - 2) / 9 = 12 blocks per stage and depth 164 has 18 (not
  the 18 basic blocks of He et al.'s ResNet-110: that net, 1.73M parameters, is not what the
  paper trained). Convolutions without bias, 1x1-conv shortcut on the raw block input where the
  shape changes; final BN-ReLU, 8x8 average pooling and a dense classifier. 1.15M and 1.70M
  parameters on CIFAR-10. (Depths 6n+2 below 44 would use basic blocks, as in the paper code.)
- `wrn28_10` (`models/wide_resnet.py`, `WideResNet28x10`): Wide ResNet 28-10 (Zagoruyko and
  Komodakis 2016), stages of 160, 320, 640 planes, 4 blocks each (BN-ReLU-conv3x3, dropout 0,
  BN-ReLU-conv3x3 with the stage's stride), convolutions with bias, 1x1-conv shortcut where the
  shape changes; final BN-ReLU, 8x8 average pooling and a dense classifier. About 36.5M parameters.

All output logits. Weight decay is an L2 penalty `keras.regularizers.L2(weight_decay / 2)` on
every parameter (conv and dense kernels and biases, BN gamma and beta), whose gradient
`weight_decay * w` is exactly torch's `SGD(weight_decay=...)` as the paper's code uses it.
BatchNorm uses Keras momentum 0.9 (torch's default `momentum=0.1`) and torch's epsilon 1e-5.
(The paper code's WideResNet gives its last BN torch `momentum=0.9`, i.e. Keras 0.1, likely by
accident; here it has 0.9 like every other BN.) Strided 3x3 convolutions pad one pixel on every
side as torch's `padding=1` does (Keras' `"same"` would pad only bottom and right). Initializers
follow the paper code: VGG and PreResNet convs `normal(0, sqrt(2 / (k * k * out_channels)))`,
everything else torch's default `uniform(+-1 / sqrt(fan_in))` for kernels and biases (the WRN
file's `conv_init` is never called in the paper code), BN gamma 1 and beta 0.
"""

import math

from keras_swa.backend import keras

__all__ = ["NETS", "build", "preresnet110", "preresnet164", "vgg16_bn", "wrn28_10"]

NETS = ("vgg16_bn", "preresnet110", "preresnet164", "wrn28_10")

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# torch's `Conv2d` init in the VGG and PreResNet files: normal(0, sqrt(2 / (k * k * out_channels))).
_FAN_OUT_NORMAL = "fan_out_normal"
# torch's default `Conv2d`/`Linear` init: kaiming_uniform(a=sqrt(5)), i.e. uniform(+-1/sqrt(fan_in)).
_TORCH_DEFAULT = "torch_default"


class _Layers:
    """Makes torch-like layers with the weight decay on every parameter."""

    def __init__(self, weight_decay, bn_momentum=0.9):
        if weight_decay < 0:
            raise ValueError(
                f"`weight_decay` must be >= 0. Received: weight_decay={weight_decay!r}"
            )
        self.l2 = weight_decay / 2.0
        self.bn_momentum = bn_momentum

    def _reg(self):
        return keras.regularizers.L2(self.l2) if self.l2 else None

    @staticmethod
    def _torch_bias_init(fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return keras.initializers.RandomUniform(-bound, bound)

    def conv(self, x, filters, kernel_size, strides, use_bias, init, name):
        """torch `Conv2d(padding=kernel_size // 2)`."""
        cin = x.shape[-1]
        if init == _FAN_OUT_NORMAL:
            kernel_init = keras.initializers.VarianceScaling(
                2.0, mode="fan_out", distribution="untruncated_normal"
            )
            bias_init = "zeros"
        else:
            kernel_init = keras.initializers.VarianceScaling(
                1.0 / 3.0, mode="fan_in", distribution="uniform"
            )
            bias_init = self._torch_bias_init(cin * kernel_size * kernel_size)
        pad = kernel_size // 2
        if strides != 1 and pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same"
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            kernel_initializer=kernel_init,
            bias_initializer=bias_init,
            kernel_regularizer=self._reg(),
            bias_regularizer=self._reg() if use_bias else None,
            name=name,
        )(x)

    def bn(self, x, name):
        return keras.layers.BatchNormalization(
            momentum=self.bn_momentum,
            epsilon=1e-5,
            gamma_regularizer=self._reg(),
            beta_regularizer=self._reg(),
            name=name,
        )(x)

    def bn_relu(self, x, name):
        return keras.layers.ReLU(name=f"{name}_relu")(self.bn(x, name))

    def dense(self, x, units, name):
        """torch `Linear(in, units)` with its default init."""
        return keras.layers.Dense(
            units,
            kernel_initializer=keras.initializers.VarianceScaling(
                1.0 / 3.0, mode="fan_in", distribution="uniform"
            ),
            bias_initializer=self._torch_bias_init(x.shape[-1]),
            kernel_regularizer=self._reg(),
            bias_regularizer=self._reg(),
            name=name,
        )(x)


def _check(num_classes, input_shape):
    if int(num_classes) < 2:
        raise ValueError(f"`num_classes` must be >= 2. Received: num_classes={num_classes!r}")
    if len(input_shape) != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, channels). Received: input_shape={input_shape!r}"
        )


def vgg16_bn(num_classes=10, weight_decay=5e-4, input_shape=(32, 32, 3)):
    """VGG-16 with BatchNorm of the SWA paper's code (`models/vgg.py`, `VGG16BN`).

    Args:
        num_classes: Number of classes (logits).
        weight_decay: torch-style weight decay, applied as `L2(weight_decay / 2)` to every
            parameter.
        input_shape: Image shape, `(height, width, channels)`; 32x32 leaves a 1x1x512 map.

    Returns:
        An uncompiled `keras.Model` named `"vgg16_bn"` outputting logits.
    """
    _check(num_classes, input_shape)
    layers = _Layers(weight_decay)
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = inputs
    conv_i, pool_i = 0, 0
    for v in _VGG16_CFG:
        if v == "M":
            pool_i += 1
            x = keras.layers.MaxPooling2D(2, strides=2, name=f"pool{pool_i}")(x)
        else:
            conv_i += 1
            x = layers.conv(x, v, 3, 1, True, _FAN_OUT_NORMAL, f"conv{conv_i}")
            x = layers.bn_relu(x, f"bn{conv_i}")
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.5, name="dropout1")(x)
    x = keras.layers.ReLU(name="fc1_relu")(layers.dense(x, 512, "fc1"))
    x = keras.layers.Dropout(0.5, name="dropout2")(x)
    x = keras.layers.ReLU(name="fc2_relu")(layers.dense(x, 512, "fc2"))
    logits = layers.dense(x, num_classes, "logits")
    return keras.Model(inputs, logits, name="vgg16_bn")


def _preresnet(depth, num_classes, weight_decay, input_shape):
    _check(num_classes, input_shape)
    bottleneck = depth >= 44
    if bottleneck:
        if (depth - 2) % 9:
            raise ValueError(f"Bottleneck PreResNet depth must be 9n+2. Received: depth={depth}")
        n, expansion = (depth - 2) // 9, 4
    else:
        if (depth - 2) % 6:
            raise ValueError(f"Basic PreResNet depth must be 6n+2. Received: depth={depth}")
        n, expansion = (depth - 2) // 6, 1
    layers = _Layers(weight_decay)
    init = _FAN_OUT_NORMAL
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = layers.conv(inputs, 16, 3, 1, False, init, "conv1")
    inplanes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for block in range(n):
            stride = 2 if (stage > 1 and block == 0) else 1
            name = f"stage{stage}_block{block + 1}"
            residual = x
            if block == 0 and (stride != 1 or inplanes != planes * expansion):
                residual = layers.conv(
                    x, planes * expansion, 1, stride, False, init, f"{name}_downsample"
                )
            if bottleneck:
                out = layers.bn_relu(x, f"{name}_bn1")
                out = layers.conv(out, planes, 1, 1, False, init, f"{name}_conv1")
                out = layers.bn_relu(out, f"{name}_bn2")
                out = layers.conv(out, planes, 3, stride, False, init, f"{name}_conv2")
                out = layers.bn_relu(out, f"{name}_bn3")
                out = layers.conv(out, planes * 4, 1, 1, False, init, f"{name}_conv3")
            else:
                out = layers.bn_relu(x, f"{name}_bn1")
                out = layers.conv(out, planes, 3, stride, False, init, f"{name}_conv1")
                out = layers.bn_relu(out, f"{name}_bn2")
                out = layers.conv(out, planes, 3, 1, False, init, f"{name}_conv2")
            x = keras.layers.Add(name=f"{name}_add")([out, residual])
            inplanes = planes * expansion
    x = layers.bn_relu(x, "bn")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)  # AvgPool2d(8) on the 8x8 map
    logits = layers.dense(x, num_classes, "logits")
    return keras.Model(inputs, logits, name=f"preresnet{depth}")


def preresnet110(num_classes=10, weight_decay=3e-4, input_shape=(32, 32, 3)):
    """PreResNet-110 of the SWA paper's code (`models/preresnet.py`): 12 bottlenecks a stage.

    Args:
        num_classes: Number of classes (logits).
        weight_decay: torch-style weight decay, applied as `L2(weight_decay / 2)` to every
            parameter.
        input_shape: Image shape, `(height, width, channels)`.

    Returns:
        An uncompiled `keras.Model` named `"preresnet110"` outputting logits.
    """
    return _preresnet(110, num_classes, weight_decay, input_shape)


def preresnet164(num_classes=10, weight_decay=3e-4, input_shape=(32, 32, 3)):
    """PreResNet-164 of the SWA paper's code (`models/preresnet.py`): 18 bottlenecks a stage.

    Args:
        num_classes: Number of classes (logits).
        weight_decay: torch-style weight decay, applied as `L2(weight_decay / 2)` to every
            parameter.
        input_shape: Image shape, `(height, width, channels)`.

    Returns:
        An uncompiled `keras.Model` named `"preresnet164"` outputting logits.
    """
    return _preresnet(164, num_classes, weight_decay, input_shape)


def wrn28_10(num_classes=10, weight_decay=5e-4, input_shape=(32, 32, 3)):
    """Wide ResNet 28-10 of the SWA paper's code (`models/wide_resnet.py`), dropout 0.

    Args:
        num_classes: Number of classes (logits).
        weight_decay: torch-style weight decay, applied as `L2(weight_decay / 2)` to every
            parameter.
        input_shape: Image shape, `(height, width, channels)`.

    Returns:
        An uncompiled `keras.Model` named `"wrn28_10"` outputting logits.
    """
    _check(num_classes, input_shape)
    depth, k = 28, 10
    n = (depth - 4) // 6
    layers = _Layers(weight_decay)
    init = _TORCH_DEFAULT
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = layers.conv(inputs, 16, 3, 1, True, init, "conv1")
    in_planes = 16
    for stage, (planes, first_stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), 1):
        for block in range(n):
            stride = first_stride if block == 0 else 1
            name = f"stage{stage}_block{block + 1}"
            shortcut = x
            if stride != 1 or in_planes != planes:
                shortcut = layers.conv(x, planes, 1, stride, True, init, f"{name}_shortcut")
            out = layers.bn_relu(x, f"{name}_bn1")
            out = layers.conv(out, planes, 3, 1, True, init, f"{name}_conv1")
            # The paper code's nn.Dropout(p=0) here is the identity.
            out = layers.bn_relu(out, f"{name}_bn2")
            out = layers.conv(out, planes, 3, stride, True, init, f"{name}_conv2")
            x = keras.layers.Add(name=f"{name}_add")([out, shortcut])
            in_planes = planes
    x = layers.bn_relu(x, "bn")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)  # avg_pool2d(8) on the 8x8 map
    logits = layers.dense(x, num_classes, "logits")
    return keras.Model(inputs, logits, name="wrn28_10")


_BUILDERS = {
    "vgg16_bn": vgg16_bn,
    "preresnet110": preresnet110,
    "preresnet164": preresnet164,
    "wrn28_10": wrn28_10,
}


def build(name, num_classes, weight_decay, input_shape=(32, 32, 3)):
    """Builds one of the paper's networks by name.

    Args:
        name: One of `NETS`: `"vgg16_bn"`, `"preresnet110"`, `"preresnet164"`, `"wrn28_10"`.
        num_classes: Number of classes (logits).
        weight_decay: torch-style weight decay, applied as `L2(weight_decay / 2)` to every
            parameter.
        input_shape: Image shape, `(height, width, channels)`.

    Returns:
        An uncompiled `keras.Model` outputting logits.

    Raises:
        ValueError: If `name` is not in `NETS`, or an argument is out of range.
    """
    if name not in _BUILDERS:
        raise ValueError(f"`name` must be one of {NETS}. Received: name={name!r}")
    return _BUILDERS[name](num_classes, weight_decay, input_shape)
