"""Paper presets for the accuracy benchmark: Table 1 of the SWA paper on CIFAR-10 and CIFAR-100.

Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization"
(arXiv:1803.05407). Hyperparameters are those of the paper code's README "Examples"
(github.com/timgaripov/swa), which reproduce Table 1: SGD with momentum 0.9, batch 128,
pad-4 random crop and horizontal flip, the paper's schedule (lr_init constant for the first half,
linear decay to swa_lr by 90% of the budget, then swa_lr), SWA started at epoch `swa_start` with
one capture per epoch. The README uses the same hyperparameters on CIFAR-10 and CIFAR-100 except
for PreResNet's swa_lr (0.05 on CIFAR-100, 0.01 on CIFAR-10), so WRN-28-10 keeps swa_lr 0.05 on
CIFAR-10 and VGG16 0.01 on both.

`reported` holds the test accuracies (%) of the README's results table (Table 1): SGD at one
budget, SWA at 1, 1.25 and 1.5 budgets, as `(mean, std)`. The table lists SGD at one budget only,
so SGD at 1.25 and 1.5 budgets is None (not reported). `gpu_time` is a rough, unmeasured
estimate for one budget on one modern GPU; on CPU these runs are impractical (days to weeks).

`one_step` builds a preset's net and trains it one step on random data: CI's check that every
preset builds and trains.
"""

import numpy as np

from keras_swa.backend import keras

from benchmarks import paper_nets

__all__ = ["PRESETS", "one_step"]

_COMMON = {
    "batch_size": 128,
    "momentum": 0.9,
    "augmentation": "crop_flip",  # pad 4, random 32x32 crop, random horizontal flip
    "captures_per_epoch": 1,
}


def _preset(net, dataset, lr_init, wd, epochs, swa_start, swa_lr, sgd, swa, gpu_time):
    preset = {
        "net": net,
        "dataset": dataset,
        "num_classes": 10 if dataset == "cifar10" else 100,
        "lr_init": lr_init,
        "weight_decay": wd,
        "epochs": epochs,  # one budget: the SGD run's length
        "swa_start": swa_start,
        "swa_lr": swa_lr,
        "reported": {
            # SGD: the table lists one budget only; 1.25 and 1.5 budgets are not reported.
            "sgd": {1.0: sgd, 1.25: None, 1.5: None},
            "swa": dict(zip((1.0, 1.25, 1.5), swa)),
        },
        "gpu_time": gpu_time,
    }
    preset.update(_COMMON)
    return preset


PRESETS = {
    "vgg16_cifar10": _preset(
        "vgg16_bn", "cifar10", 0.05, 5e-4, 200, 161, 0.01,
        (93.25, 0.16), ((93.59, 0.16), (93.70, 0.22), (93.64, 0.18)),
        "about 1-2 h per budget",
    ),
    "vgg16_cifar100": _preset(
        "vgg16_bn", "cifar100", 0.05, 5e-4, 200, 161, 0.01,
        (72.55, 0.10), ((73.91, 0.12), (74.17, 0.15), (74.27, 0.25)),
        "about 1-2 h per budget",
    ),
    "preresnet110_cifar10": _preset(
        "preresnet110", "cifar10", 0.1, 3e-4, 150, 126, 0.01,
        (95.03, 0.05), ((95.51, 0.10), (95.65, 0.03), (95.82, 0.03)),
        "about 2-4 h per budget",
    ),
    "preresnet110_cifar100": _preset(
        "preresnet110", "cifar100", 0.1, 3e-4, 150, 126, 0.05,
        (76.77, 0.38), ((78.75, 0.16), (78.91, 0.29), (79.10, 0.21)),
        "about 2-4 h per budget",
    ),
    "preresnet164_cifar10": _preset(
        "preresnet164", "cifar10", 0.1, 3e-4, 150, 126, 0.01,
        (95.28, 0.10), ((95.56, 0.11), (95.77, 0.04), (95.83, 0.03)),
        "about 3-6 h per budget",
    ),
    "preresnet164_cifar100": _preset(
        "preresnet164", "cifar100", 0.1, 3e-4, 150, 126, 0.05,
        (78.49, 0.36), ((79.77, 0.17), (80.18, 0.23), (80.35, 0.16)),
        "about 3-6 h per budget",
    ),
    "wrn28_10_cifar10": _preset(
        "wrn28_10", "cifar10", 0.1, 5e-4, 200, 161, 0.05,
        (96.18, 0.11), ((96.45, 0.11), (96.64, 0.08), (96.79, 0.05)),
        "about 8-20 h per budget",
    ),
    "wrn28_10_cifar100": _preset(
        "wrn28_10", "cifar100", 0.1, 5e-4, 200, 161, 0.05,
        (80.82, 0.23), ((81.46, 0.23), (81.91, 0.27), (82.15, 0.27)),
        "about 8-20 h per budget",
    ),
}


def one_step(preset_name, num_images=4, seed=0, run_eagerly=True):
    """Builds a preset's net and trains it one SGD step on random 32x32x3 images.

    Args:
        preset_name: A key of `PRESETS`.
        num_images: Batch size of the one step.
        seed: Seed of the weights, the images and the labels.
        run_eagerly: Run the step eagerly (default): one step does not repay tracing a graph
            of a 100-layer net.

    Returns:
        The step's loss (cross-entropy plus the weight-decay penalty), a Python float.

    Raises:
        ValueError: If `preset_name` is not a preset, or `num_images` < 1.
    """
    if preset_name not in PRESETS:
        raise ValueError(
            f"`preset_name` must be one of {sorted(PRESETS)}. Received: {preset_name!r}"
        )
    if int(num_images) < 1:
        raise ValueError(f"`num_images` must be >= 1. Received: num_images={num_images!r}")
    preset = PRESETS[preset_name]
    keras.utils.set_random_seed(seed)
    model = paper_nets.build(preset["net"], preset["num_classes"], preset["weight_decay"])
    model.compile(
        optimizer=keras.optimizers.SGD(preset["lr_init"], momentum=preset["momentum"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
    )
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((num_images, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, preset["num_classes"], size=(num_images,)).astype("int32")
    loss = model.train_on_batch(images, labels)
    if isinstance(loss, (list, tuple)):
        loss = loss[0]
    return float(loss)
