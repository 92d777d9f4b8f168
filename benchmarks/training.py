"""Seeded, forkable training runs for the accuracy benchmark.

An SGD run and an SWA run from the same initialisation are identical until their learning-rate
schedules first differ (the paper's schedule is flat at `lr_init` for the first half of the SGD
budget, and for the first 0.4 B of an SWA run starting at 0.8 B). Training that shared part once
and continuing each arm from a copy of it saves a third to a half of the compute, and changes
nothing, if every source of randomness after the fork point depends only on the seed and the
epoch rather than on what ran before:

- the batch order of epoch `e` is a numpy permutation seeded by `(seed, e)`;
- the augmentation of batch `b` of epoch `e` uses stateless random ops seeded by `(seed, e, b)`;
- the weights, the BatchNorm statistics and every optimizer variable (iterations, momenta) are
  copied at the fork (`Run.snapshot` / `Run.restore`); the schedules are functions of
  `optimizer.iterations`, so they continue where the trunk stopped.

With `tf.config.experimental.enable_op_determinism()` a forked run then equals the unforked one
bit for bit (tests/test_fork.py checks it for the SGD and the SWA arm).

Example:

```python
import numpy as np
from benchmarks import training
x = np.random.RandomState(0).rand(64, 8, 8, 1).astype("float32")
y = np.arange(64) % 2
spec = training.RunSpec(model="cnn", width=2, num_classes=2, batch_size=32, lr_init=0.05,
                        weight_decay=1e-4, augment_pad=1)
run = training.Run(spec, x, y, seed=0, total_epochs=2)
run.fit(0, 1)
trunk = run.snapshot()
fork = training.Run(spec, x, y, seed=0, total_epochs=2)
fork.restore(trunk)
fork.fit(1, 2)
assert fork.epoch == 2
```
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

import keras_swa
from benchmarks import models as models_lib
from keras_swa.backend import keras

__all__ = ["RunSpec", "Run", "cross_entropy", "epoch_order"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What defines a run apart from its seed and its schedule.

    Attributes:
        model: a `benchmarks.models.MODELS` name.
        width: filters of the first stage.
        num_classes: number of classes.
        batch_size: training batch size.
        lr_init: the initial learning rate.
        weight_decay: torch-style weight decay (gradient `wd * w`).
        weight_decay_scope: `"kernels"` or `"all"`.
        momentum: SGD momentum.
        bn_momentum: Keras BatchNorm momentum (0.9 is torch's 0.1).
        augment_pad: crop padding in pixels with a random horizontal flip; 0 for no augmentation.
        blocks_per_stage: pre-activation blocks per stage (`preresnet`).
    """

    model: str = "cnn"
    width: int = 16
    num_classes: int = 10
    batch_size: int = 128
    lr_init: float = 0.1
    weight_decay: float = 5e-4
    weight_decay_scope: str = "all"
    momentum: float = 0.9
    bn_momentum: float = 0.9
    augment_pad: int = 2
    blocks_per_stage: int = 1


def epoch_order(seed, epoch, n):
    """The batch order of one epoch: a permutation of `range(n)` that depends on `(seed, epoch)` only."""
    return np.random.RandomState([seed, epoch]).permutation(n)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy in nats (numpy, float64), without any regularization term."""
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(labels)), np.asarray(labels)]))


class Run:
    """One training run: a model, its SGD optimizer and a seeded, epoch-addressable data stream.

    Args:
        spec: a `RunSpec`.
        x: training images, float32 `(N, H, W, C)`.
        y: integer labels `(N,)`.
        seed: the run's seed (initialisation, batch order, augmentation).
        total_epochs: epochs the schedule is laid out for (the paper's schedule for `budget`
            epochs is used unless `schedule` is given).
        schedule: a `keras.optimizers.schedules.LearningRateSchedule`, or `None` for
            `PaperSchedule(lr_init, 0.01 lr_init, swa_start=total_epochs epochs)` (SGD).
    """

    def __init__(self, spec, x, y, seed, total_epochs, schedule=None):
        self.spec, self.seed = spec, int(seed)
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y)
        self.steps_per_epoch = math.ceil(len(self.x) / spec.batch_size)
        if schedule is None:
            schedule = keras_swa.schedules.PaperSchedule(
                spec.lr_init, 0.01 * spec.lr_init, swa_start=total_epochs * self.steps_per_epoch
            )
        self.schedule = schedule
        keras.utils.set_random_seed(self.seed)
        self.model = models_lib.build_model(
            spec.model,
            self.x.shape[1:],
            spec.num_classes,
            width=spec.width,
            blocks_per_stage=spec.blocks_per_stage,
            weight_decay=spec.weight_decay,
            weight_decay_scope=spec.weight_decay_scope,
            bn_momentum=spec.bn_momentum,
        )
        self.optimizer = keras.optimizers.SGD(schedule, momentum=spec.momentum)
        self.model.compile(
            optimizer=self.optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        self.optimizer.build(self.model.trainable_variables)
        self.epoch = 0
        self.history = {"loss": [], "accuracy": []}

    def _dataset(self, start, end):
        n, bs, pad, seed = len(self.x), self.spec.batch_size, self.spec.augment_pad, self.seed
        order = np.concatenate([epoch_order(seed, e, n) for e in range(start, end)])
        # (epoch, batch-in-epoch) of every batch, for the stateless augmentation seeds.
        tags = np.array(
            [(e, b) for e in range(start, end) for b in range(self.steps_per_epoch)], np.int32
        )
        bounds = [min(n, b * bs) for b in range(self.steps_per_epoch + 1)]
        starts = np.array([i * n + bounds[b] for i in range(end - start)
                           for b in range(self.steps_per_epoch)], np.int64)
        sizes = np.array([bounds[b + 1] - bounds[b] for _ in range(end - start)
                          for b in range(self.steps_per_epoch)], np.int64)
        x, y, order = tf.constant(self.x), tf.constant(self.y), tf.constant(order)

        def batch(tag, begin, size):
            index = order[begin : begin + size]
            images, labels = tf.gather(x, index), tf.gather(y, index)
            if pad:
                aug_seed = tf.stack([seed * 100_003 + tag[0], tag[1]])
                images, labels = models_lib.augment_crop_flip(images, labels, pad, aug_seed)
            return images, labels

        ds = tf.data.Dataset.from_tensor_slices((tags, starts, sizes)).map(batch)
        return ds.prefetch(tf.data.AUTOTUNE)

    def fit(self, start, end, callbacks=()):
        """Trains epochs `[start, end)` (0-based). `start` must be where the run stands."""
        if start != self.epoch:
            raise ValueError(f"The run stands at epoch {self.epoch}. Received: start={start}")
        if end <= start:
            return
        history = self.model.fit(
            self._dataset(start, end),
            initial_epoch=start,
            epochs=end,
            steps_per_epoch=self.steps_per_epoch,
            callbacks=list(callbacks),
            verbose=0,
        )
        for key in self.history:
            self.history[key].extend(float(v) for v in history.history[key])
        self.epoch = end

    def snapshot(self):
        """Everything training depends on at this point: weights, BN statistics, optimizer state."""
        return {
            "epoch": self.epoch,
            "weights": [np.array(w) for w in self.model.get_weights()],
            "optimizer": [np.array(v) for v in self.optimizer.variables],
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def restore(self, snapshot):
        """Puts this run where `snapshot` was taken (same spec and seed; any schedule)."""
        self.model.set_weights(snapshot["weights"])
        variables = self.optimizer.variables
        if len(variables) != len(snapshot["optimizer"]):
            raise ValueError(
                "The snapshot comes from a different optimizer. Received: "
                f"{len(snapshot['optimizer'])} optimizer variables, expected {len(variables)}"
            )
        for variable, value in zip(variables, snapshot["optimizer"]):
            variable.assign(value)
        self.epoch = snapshot["epoch"]
        self.history = {k: list(v) for k, v in snapshot["history"].items()}

    def predict(self, x, model=None):
        """Logits of `model` (default: the trained model) on `x`, in large batches."""
        return (model or self.model).predict(x, batch_size=1000, verbose=0)
