"""Does SWA generalise better than SGD at the same training budget? The paper's Table 1, measured.

The protocol follows Izmailov et al. (2018), Section 5.1 and the paper's code
(github.com/timgaripov/swa). For each seed:

- SGD baseline: SGD with momentum 0.9 and weight decay (an L2 kernel penalty with gradient
  `wd * w`, torch's `weight_decay`), trained for a budget of `B` epochs with the paper's schedule
  `keras_swa.schedules.PaperSchedule(lr_init, 0.01 * lr_init, swa_start=B epochs)`: flat for 50%
  of the budget, linear down to 1% of `lr_init` by 90%, flat after that. Its final iterate is the
  "SGD" row.
- Keras EMA (what a Keras user would pick instead of SWA): the same SGD run uses
  `SGD(..., use_ema=True, ema_momentum=--ema_momentum)`; the EMA changes nothing about training
  (`ema_overwrite_frequency=None`). After training, `optimizer.finalize_variable_values(...)` puts
  the EMA weights into the model (Keras' `fit` does the same at its end). Keras averages only the
  trainable weights, so the BatchNorm statistics are those of the SGD iterates: that is the
  "EMA" row. "EMA + update_bn" recomputes them for the EMA weights with `keras_swa.update_bn`.
- SWA: ONE run from the same initialisation, with `PaperSchedule(lr_init, swa_lr, swa_start=S)`
  (the pre-SWA schedule that reaches `swa_lr = --swa_lr_ratio * lr_init` at the SWA start
  `S = round(--swa_start * B)` epochs, then constant `swa_lr`, or with `--cyclic` the paper's
  cyclic schedule down to `--swa_lr_ratio_min * lr_init` within each epoch) and the
  `keras_swa.SWA` callback capturing the weights once per epoch from epoch `S` on. The run lasts
  `1.5 B` epochs; at `B`, `1.25 B` and `1.5 B` epochs the averages are written into a COPY of the
  model (`keras.models.clone_model`, never the model being trained), the copy's BN statistics are
  recomputed with `keras_swa.update_bn` on the training images, and the copy is evaluated:
  the "SWA" rows at budgets 1, 1.25 and 1.5 from one run, without disturbing training.
  The same is done after every epoch of the SWA phase for the curve of the plot.
- Ablation at budget 1: the averages with the BN statistics of the current SGD iterate of the SWA
  run (no BN recompute).
- SWAG and FGE (Maddox et al. 2019; Garipov et al. 2018) from the same SWA run and the same
  snapshots: at every SWA capture the weights are copied into the evaluation copy, on which a
  `keras_swa.SWAG` and a `keras_swa.FGE` capture them. At budget 1, SWAG's Bayesian model average
  (`--swag_samples` draws, BN recomputed per draw) and FGE's ensemble (every snapshot with its own
  BN statistics) are evaluated beside SGD and SWA: accuracy, negative log-likelihood, expected
  calibration error, and prediction time relative to one model.

Hyperparameters other than SWA's (set by the paper's rules: start at 0.8 B, `swa_lr` 0.1-0.5x
`lr_init`, one capture per epoch) may be tuned with `--validation_size N`, which holds out `N`
training images (disjoint from the training subset) and reports on them instead of the test set.
Tune on that, never on the test set.

Outputs in `--output_dir`: `accuracy_benchmark.json` (configuration, machine, versions, every
per-seed number and curve, mean +- std), `accuracy_benchmark.md` (a table shaped like the paper's
Table 1, with training accuracy beside) and `accuracy_benchmark.png` (test error against epoch
for SGD and SWA, the shape of the paper's Figure 2).

Default run (Fashion-MNIST from Debian's dataset-fashion-mnist, PreResNet width 24 on a
7500-image training subset, B = 20 epochs, SWA from epoch 16 to 30, 3 seeds; 2.5 B = 50 epochs
per seed). Sized to take about an hour on 2 CPU cores; the measured time is in the README and
in the JSON (`wall_time_s`):

    python -m benchmarks.accuracy_benchmark

CIFAR-10 (a local copy of the python batches; nothing is downloaded):

    python -m benchmarks.accuracy_benchmark --dataset cifar10 --data_dir ~/data --model vgg \
        --train_size 0 --budget 100

Smoke test (a tiny subset and a few epochs, well under 2 minutes):

    python -m benchmarks.accuracy_benchmark --quick --output_dir /tmp/bench

Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018, arXiv 1803.05407.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_swa  # noqa: E402
from benchmarks import data as data_lib  # noqa: E402
from benchmarks import flags as bench  # noqa: E402
from benchmarks import metrics as metrics_lib  # noqa: E402
from benchmarks import models as models_lib  # noqa: E402
from benchmarks import confirm  # noqa: E402
from benchmarks import paper_nets  # noqa: E402
from benchmarks import presets as presets_lib  # noqa: E402
from benchmarks import screening  # noqa: E402
from keras_swa.backend import keras  # noqa: E402

FLAGS = flags.FLAGS
NAME = "accuracy_benchmark"

flags.DEFINE_enum(
    "mode",
    "final",
    ["final", "screen", "confirm"],
    "'final': the table on the evaluation split; 'screen': the validation-only screen of "
    "benchmarks/screening.py (never reads the test files), written to accuracy_screen.*; "
    "'confirm': the screen's chosen configuration on the test split, once "
    "(benchmarks/confirm.py), written to accuracy_confirm.*.",
)
flags.DEFINE_enum(
    "preset",
    None,
    list(presets_lib.PRESETS),
    "A row of the paper's Table 1 (docs/presets.md): its network, data set, lr_init, weight "
    "decay, budget, SWA start and swa_lr, with pad-4 crop + flip, all training images and the "
    "full test set. Needs a GPU and CIFAR on disk (--data_dir); flags given explicitly win.",
)
flags.DEFINE_list(
    "screen_regimes",
    ["crop_flip", "none"],
    "With --mode=screen: the augmentation regimes screened ('crop_flip', 'none').",
)
flags.DEFINE_string(
    "screen_results",
    os.path.join("benchmarks", "results", "accuracy_screen.json"),
    "With --mode=confirm: the screen's JSON, whose chosen configuration is run.",
)
flags.DEFINE_string(
    "configuration",
    None,
    "With --mode=confirm: run this screened configuration (its name in the screen's JSON) "
    "instead of the one the decision rule chose; the report says it was not the rule's choice.",
)
flags.DEFINE_enum("dataset", "fashion_mnist", list(data_lib.DATASETS), "The data set.")
flags.DEFINE_string(
    "data_dir",
    None,
    "Folder with the data files. Fashion-MNIST defaults to /usr/share/datasets/fashion-mnist "
    "(Debian's dataset-fashion-mnist); CIFAR needs the folder holding cifar-10-batches-py/ or "
    "cifar-100-python/.",
)
flags.DEFINE_enum("model", "preresnet", list(models_lib.MODELS), "The network.")
flags.DEFINE_integer("width", None, "Filters of the first stage. Defaults to 24 (4 with --quick).")
flags.DEFINE_integer("blocks_per_stage", 1, "Pre-activation blocks per stage (preresnet).")
flags.DEFINE_integer(
    "train_size",
    None,
    "Training images used (a fixed random subset, --data_seed); 0 for all. Defaults to 7500 "
    "(256 with --quick).",
)
flags.DEFINE_integer(
    "validation_size",
    0,
    "If positive, hold out this many training images (disjoint from the training subset) and "
    "report on them instead of the test set: use this, never the test set, to tune.",
)
flags.DEFINE_integer(
    "test_size", None, "Test images used; 0 for all. Defaults to 0 (256 with --quick)."
)
flags.DEFINE_integer(
    "budget", None, "The SGD budget B in epochs (SWA runs to 1.5 B). Defaults to 20 (4 with --quick)."
)
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_float("lr_init", 0.1, "Initial learning rate of SGD.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 3e-4, "Weight decay (L2 gradient wd * w on the kernels).")
flags.DEFINE_float("swa_start", 0.8, "SWA start as a fraction of the budget B.")
flags.DEFINE_float("swa_lr_ratio", 0.2, "swa_lr / lr_init.")
flags.DEFINE_bool("cyclic", False, "Cyclic SWA learning rate (one cycle per epoch) instead of constant.")
flags.DEFINE_float("swa_lr_ratio_min", 0.01, "With --cyclic: the cycle's lowest lr / lr_init.")
flags.DEFINE_float("ema_momentum", 0.99, "ema_momentum of the Keras use_ema baseline.")
flags.DEFINE_integer(
    "swa_curve_every",
    1,
    "Evaluate the BN-fixed SWA copy every this many epochs of the SWA phase (the plot); the "
    "budget marks are always evaluated.",
)
flags.DEFINE_string(
    "augment",
    "auto",
    "'crop_flip', 'none' or 'auto' (crop_flip for CIFAR, none for Fashion-MNIST).",
)
flags.DEFINE_integer(
    "swag_samples", None, "SWAG weight draws for its Bayesian model average. Defaults to 10 (2 with --quick)."
)
flags.DEFINE_float("swag_scale", 0.5, "SWAG covariance scale (the paper's 0.5).")
flags.DEFINE_integer("swag_rank", 20, "SWAG low-rank columns K (the last K captures).")
flags.DEFINE_integer("ece_bins", 15, "Equal-width confidence bins of the expected calibration error.")
flags.DEFINE_integer("seeds", None, "Number of seeds (mean +- std). Defaults to 3 (2 with --quick).")
flags.DEFINE_integer("first_seed", 0, "The first seed; the others follow.")
flags.DEFINE_integer("data_seed", 0, "Seed of the training/validation subset choice.")

_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
_EVAL_BATCH = 1000

# (key, method, budget multiple) of the table rows, in order.
ROWS = (
    ("sgd", "SGD", 1.0),
    ("swa_1", "SWA", 1.0),
    ("swa_1.25", "SWA", 1.25),
    ("swa_1.5", "SWA", 1.5),
    ("swa_no_bn", "SWA without BN recompute (ablation)", 1.0),
    ("ema", "Keras use_ema EMA (BN stats of the SGD run)", 1.0),
    ("ema_bn", "Keras use_ema EMA + update_bn", 1.0),
    ("swa_run_iterate", "SGD iterate at the end of the SWA run (swa_lr)", 1.5),
    ("swag", "SWAG (Bayesian model average of the draws)", 1.0),
    ("fge", "FGE-style ensemble of the SWA run's snapshots", 1.0),
)

# Rows of the second table (accuracy, NLL, calibration and prediction cost at budget 1).
UNCERTAINTY_ROWS = ("sgd", "swa_1", "swag", "fge")


def _default(value, normal, quick):
    if value is not None:
        return value
    return quick if FLAGS.quick else normal


def _apply_preset():
    """Sets the flags a `--preset` defines, unless given on the command line."""
    preset = presets_lib.PRESETS[FLAGS.preset]
    values = {
        "dataset": preset["dataset"],
        "train_size": 0,
        "test_size": 0,
        "budget": preset["epochs"],
        "batch_size": preset["batch_size"],
        "lr_init": preset["lr_init"],
        "momentum": preset["momentum"],
        "weight_decay": preset["weight_decay"],
        # start epoch = round(fraction * budget): the paper's swa_start exactly.
        "swa_start": preset["swa_start"] / preset["epochs"],
        "swa_lr_ratio": preset["swa_lr"] / preset["lr_init"],
        "augment": "crop_flip",
    }
    for name, value in values.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


def resolve_config():
    """The run's configuration (flags with their defaults resolved), validated."""
    bench.validate_common_flags()
    if FLAGS.preset:
        _apply_preset()
    cfg = {
        "quick": FLAGS.quick,
        "dataset": FLAGS.dataset,
        "data_dir": FLAGS.data_dir,
        "model": FLAGS.model,
        "width": _default(FLAGS.width, 24, 4),
        "blocks_per_stage": FLAGS.blocks_per_stage,
        "train_size": _default(FLAGS.train_size, 7500, 256),
        "validation_size": FLAGS.validation_size,
        "test_size": _default(FLAGS.test_size, 0, 256),
        "budget": _default(FLAGS.budget, 20, 4),
        "batch_size": FLAGS.batch_size if not FLAGS.quick else min(FLAGS.batch_size, 64),
        "lr_init": FLAGS.lr_init,
        "momentum": FLAGS.momentum,
        "weight_decay": FLAGS.weight_decay,
        "swa_start_fraction": FLAGS.swa_start,
        "swa_lr_ratio": FLAGS.swa_lr_ratio,
        "cyclic": FLAGS.cyclic,
        "swa_lr_ratio_min": FLAGS.swa_lr_ratio_min if FLAGS.cyclic else None,
        "ema_momentum": FLAGS.ema_momentum,
        "swa_curve_every": FLAGS.swa_curve_every,
        "swag_samples": _default(FLAGS.swag_samples, 10, 2),
        "swag_scale": FLAGS.swag_scale,
        "swag_rank": FLAGS.swag_rank,
        "ece_bins": FLAGS.ece_bins,
        "seeds": _default(FLAGS.seeds, 3, 2),
        "first_seed": FLAGS.first_seed,
        "data_seed": FLAGS.data_seed,
        "preset": FLAGS.preset,
    }
    augment = FLAGS.augment
    if augment == "auto":
        augment = "none" if cfg["dataset"] == "fashion_mnist" else "crop_flip"
    if augment not in ("none", "crop_flip"):
        raise app.UsageError(
            f"`--augment` must be 'auto', 'none' or 'crop_flip'. Received: augment={augment!r}"
        )
    cfg["augment"] = augment
    for key in (
        "width", "blocks_per_stage", "batch_size", "seeds", "swa_curve_every", "swag_samples",
        "swag_rank", "ece_bins",
    ):
        if cfg[key] < 1:
            raise app.UsageError(f"`--{key}` must be a positive integer. Received: {key}={cfg[key]}")
    for key in ("train_size", "validation_size", "test_size", "data_seed", "first_seed"):
        if cfg[key] < 0:
            raise app.UsageError(
                f"`--{key}` must be a non-negative integer. Received: {key}={cfg[key]}"
            )
    if cfg["budget"] < 4:
        raise app.UsageError(
            "`--budget` must be at least 4 epochs (the SWA start and the budget marks 1, 1.25 "
            f"and 1.5 must be distinct epochs). Received: budget={cfg['budget']}"
        )
    for key in ("lr_init", "swa_lr_ratio"):
        if not cfg[key] > 0:
            raise app.UsageError(f"`--{key}` must be positive. Received: {key}={cfg[key]}")
    if not cfg["swag_scale"] >= 0:
        raise app.UsageError(
            f"`--swag_scale` must be non-negative. Received: swag_scale={cfg['swag_scale']}"
        )
    if not 0.0 <= cfg["momentum"] < 1.0:
        raise app.UsageError(f"`--momentum` must be in [0, 1). Received: momentum={cfg['momentum']}")
    if cfg["weight_decay"] < 0:
        raise app.UsageError(
            f"`--weight_decay` must be non-negative. Received: weight_decay={cfg['weight_decay']}"
        )
    if not 0.0 <= cfg["ema_momentum"] < 1.0:
        raise app.UsageError(
            f"`--ema_momentum` must be in [0, 1). Received: ema_momentum={cfg['ema_momentum']}"
        )
    if cfg["cyclic"] and not 0 < cfg["swa_lr_ratio_min"] <= cfg["swa_lr_ratio"]:
        raise app.UsageError(
            "`--swa_lr_ratio_min` must be in (0, swa_lr_ratio]. "
            f"Received: swa_lr_ratio_min={cfg['swa_lr_ratio_min']}, "
            f"swa_lr_ratio={cfg['swa_lr_ratio']}"
        )
    budget = cfg["budget"]
    start = int(round(cfg["swa_start_fraction"] * budget))
    if not 1 <= start < budget:
        raise app.UsageError(
            "`--swa_start` must put the SWA start at an epoch in [1, budget). "
            f"Received: swa_start={cfg['swa_start_fraction']} (epoch {start}), budget={budget}"
        )
    cfg["swa_start_epoch"] = start
    cfg["marks"] = {"1": budget, "1.25": int(round(1.25 * budget)), "1.5": int(round(1.5 * budget))}
    return cfg


# ---------------------------------------------------------------------------------------- data


def prepare_data(cfg):
    """Loads, subsets and standardizes the data. Returns a dict of float32 arrays and labels."""
    (x_train, y_train), (x_test, y_test) = data_lib.load_dataset(cfg["dataset"], cfg["data_dir"])
    rng = np.random.RandomState(cfg["data_seed"])
    order = rng.permutation(len(x_train))
    n_val = cfg["validation_size"]
    n_train = cfg["train_size"] or (len(x_train) - n_val)
    if n_train + n_val > len(x_train):
        raise app.UsageError(
            f"`--train_size` + `--validation_size` exceed the {len(x_train)} training images. "
            f"Received: train_size={cfg['train_size']}, validation_size={n_val}"
        )
    train_idx, val_idx = order[:n_train], order[n_train : n_train + n_val]
    mean, std = _STATS[cfg["dataset"]]
    out = {
        "x_train": data_lib.standardize(x_train[train_idx], mean, std),
        "y_train": y_train[train_idx],
    }
    if n_val:
        out["eval_split"] = "validation"
        out["x_eval"] = data_lib.standardize(x_train[val_idx], mean, std)
        out["y_eval"] = y_train[val_idx]
    else:
        if cfg["test_size"]:
            keep = np.random.RandomState(cfg["data_seed"] + 1).permutation(len(x_test))
            keep = np.sort(keep[: cfg["test_size"]])
            x_test, y_test = x_test[keep], y_test[keep]
        out["eval_split"] = "test"
        out["x_eval"] = data_lib.standardize(x_test, mean, std)
        out["y_eval"] = y_test
    return out


def _train_dataset(data, cfg, seed):
    ds = tf.data.Dataset.from_tensor_slices((data["x_train"], data["y_train"]))
    ds = ds.shuffle(len(data["x_train"]), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg["batch_size"])
    if cfg["augment"] == "crop_flip":
        ds = ds.map(models_lib.augment_crop_flip, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------- models


def _build(cfg, data):
    if cfg.get("preset"):
        preset = presets_lib.PRESETS[cfg["preset"]]
        return paper_nets.build(
            preset["net"], preset["num_classes"], cfg["weight_decay"],
            input_shape=data["x_train"].shape[1:],
        )
    return models_lib.build_model(
        cfg["model"],
        data["x_train"].shape[1:],
        _NUM_CLASSES[cfg["dataset"]],
        width=cfg["width"],
        blocks_per_stage=cfg["blocks_per_stage"],
        weight_decay=cfg["weight_decay"],
    )


def _compile(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def _evaluation_copy(model):
    """A second model of the same architecture, compiled for `evaluate` (never trained)."""
    copy = keras.models.clone_model(model)
    _compile(copy, keras.optimizers.SGD(0.0))
    return copy


def _accuracy(model, x, y):
    result = model.evaluate(x, y, batch_size=_EVAL_BATCH, verbose=0, return_dict=True)
    return float(result["accuracy"])


def _eval_metrics(model, data, bins):
    """Metrics of a single (logit-output) model on the eval split, and its prediction time."""
    start = time.perf_counter()
    logits = model.predict(data["x_eval"], batch_size=_EVAL_BATCH, verbose=0)
    seconds = time.perf_counter() - start
    out = metrics_lib.probability_metrics(metrics_lib.softmax(logits), data["y_eval"], bins)
    out["predict_s"] = seconds
    return out


class Progress(keras.callbacks.Callback):
    """Prints one line per epoch: run, epoch, metrics, elapsed time and ETA over the whole job."""

    def __init__(self, total_epochs, eval_split):
        super().__init__()
        self.total_epochs = total_epochs
        self.eval_split = eval_split
        self.done = 0
        self.start = time.time()
        self.label = ""
        self.epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total_epochs - self.done)
        print(
            f"{self.label} epoch {epoch + 1}/{self.epochs} | loss {logs.get('loss', float('nan')):.4f}"
            f" train acc {100 * logs.get('accuracy', float('nan')):.2f}%"
            f" {self.eval_split} acc {100 * logs.get('val_accuracy', float('nan')):.2f}%"
            f" | elapsed {_hms(elapsed)} | ETA {_hms(eta)}"
            f" ({self.done}/{self.total_epochs} epochs)",
            flush=True,
        )


def _hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _FinalIterate(keras.callbacks.Callback):
    """At the last epoch: the training accuracy of the current iterate, measured on a copy."""

    def __init__(self, copy, data, epochs, bins):
        super().__init__()
        self.copy, self.data, self.epochs, self.bins = copy, data, epochs, bins
        self.train_accuracy = None
        self.metrics = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            self.copy.set_weights(self.model.get_weights())
            self.train_accuracy = _accuracy(self.copy, self.data["x_train"], self.data["y_train"])
            self.metrics = _eval_metrics(self.copy, self.data, self.bins)


class _EnsembleCollector(keras.callbacks.Callback):
    """Feeds SWAG and FGE the same snapshots as SWA; evaluates both at budget 1.

    Must come right after the `keras_swa.SWA` callback: whenever SWA has just captured (its
    `n_averaged` grew), the trained model's weights are copied into the evaluation copy, which
    `SWAG` and `FGE` were built on, and both capture it. The trained model is never touched.
    """

    def __init__(self, swa, copy, data, cfg, log):
        super().__init__()
        self.swa, self.copy, self.data, self.cfg, self.log = swa, copy, data, cfg, log
        self.swag = keras_swa.SWAG(copy, max_rank=cfg["swag_rank"])
        self.fge = keras_swa.FGE(copy)
        self.seen = 0
        self.results = {}

    def on_epoch_end(self, epoch, logs=None):
        averaged = self.swa.averaged
        n = int(averaged.n_averaged.numpy()) if averaged is not None else 0
        if n > self.seen:
            self.seen = n
            self.copy.set_weights(self.model.get_weights())
            self.swag.update()
            self.fge.add()
        if epoch + 1 != self.cfg["marks"]["1"] or not self.seen:
            return
        d, cfg = self.data, self.cfg
        # One model's prediction time, for the cost ratios (the copy holds the last snapshot);
        # the first call traces the predict function: time the second.
        self.copy.predict(d["x_eval"], batch_size=_EVAL_BATCH, verbose=0)
        single = _eval_metrics(self.copy, d, cfg["ece_bins"])["predict_s"]
        start = time.perf_counter()
        probs = self.swag.predict(
            d["x_eval"],
            num_samples=cfg["swag_samples"],
            bn_data=d["x_train"],
            scale=cfg["swag_scale"],
            # The low-rank part needs two captures (it divides by rank - 1).
            cov=self.swag.rank >= 2,
            seed=epoch,
            batch_size=_EVAL_BATCH,
            bn_batch_size=_EVAL_BATCH,
            from_logits=True,
        )
        swag_s = time.perf_counter() - start
        swag = metrics_lib.probability_metrics(probs, d["y_eval"], cfg["ece_bins"])
        start = time.perf_counter()
        probs = self.fge.predict(d["x_eval"], batch_size=_EVAL_BATCH, from_logits=True)
        fge_s = time.perf_counter() - start
        fge = metrics_lib.probability_metrics(probs, d["y_eval"], cfg["ece_bins"])
        base = {"train_accuracy": None, "epochs": epoch + 1}
        self.results["swag"] = dict(
            base,
            eval_accuracy=swag["accuracy"],
            nll=swag["nll"],
            ece=swag["ece"],
            n_captures=self.seen,
            rank=int(self.swag.rank),
            low_rank=bool(self.swag.rank >= 2),
            num_samples=cfg["swag_samples"],
            predict_cost_ratio=swag_s / single,
        )
        self.results["fge"] = dict(
            base,
            eval_accuracy=fge["accuracy"],
            nll=fge["nll"],
            ece=fge["ece"],
            members=len(self.fge),
            predict_cost_ratio=fge_s / single,
        )
        self.log(
            f"  SWAG ({cfg['swag_samples']} draws, rank {self.swag.rank}): "
            f"{d['eval_split']} acc {100 * swag['accuracy']:.2f}% NLL {swag['nll']:.4f}; "
            f"FGE ({len(self.fge)} members): acc {100 * fge['accuracy']:.2f}% "
            f"NLL {fge['nll']:.4f}, {fge_s / single:.1f}x one model's prediction time"
        )


class _SWAEvaluator(keras.callbacks.Callback):
    """Evaluates a BN-fixed copy holding the SWA averages, without touching the trained model.

    Must come after the `keras_swa.SWA` callback in the list (its capture of this epoch is done).
    """

    def __init__(self, swa, copy, data, cfg, log):
        super().__init__()
        self.swa, self.copy, self.data, self.cfg, self.log = swa, copy, data, cfg, log
        self.marks = {epochs: key for key, epochs in cfg["marks"].items()}
        self.curve = {}  # epoch -> eval accuracy of the BN-fixed average
        self.at_marks = {}
        self.no_bn = None

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        averaged = self.swa.averaged
        n = int(averaged.n_averaged.numpy()) if averaged is not None else 0
        if n == 0:
            return
        since_start = done - self.cfg["swa_start_epoch"] - 1
        if done not in self.marks and since_start % self.cfg["swa_curve_every"]:
            return
        d = self.data
        if self.marks.get(done) == "1":
            # Ablation: the averages with the BN statistics of the current SGD iterate.
            self.copy.set_weights(self.model.get_weights())
            averaged.assign_to(self.copy)
            self.no_bn = {
                "eval_accuracy": _accuracy(self.copy, d["x_eval"], d["y_eval"]),
                "train_accuracy": _accuracy(self.copy, d["x_train"], d["y_train"]),
                "epochs": done,
                "n_averaged": n,
            }
        averaged.assign_to(self.copy)
        keras_swa.update_bn(self.copy, d["x_train"], batch_size=_EVAL_BATCH, verbose=0)
        accuracy = _accuracy(self.copy, d["x_eval"], d["y_eval"])
        self.curve[done] = accuracy
        if done in self.marks:
            self.at_marks[self.marks[done]] = {
                "eval_accuracy": accuracy,
                "train_accuracy": _accuracy(self.copy, d["x_train"], d["y_train"]),
                "epochs": done,
                "n_averaged": n,
            }
            if self.marks[done] == "1":
                metrics = _eval_metrics(self.copy, d, self.cfg["ece_bins"])
                self.at_marks["1"].update(nll=metrics["nll"], ece=metrics["ece"])
            self.log(
                f"  SWA at budget {self.marks[done]} (epoch {done}, {n} captures): "
                f"{d['eval_split']} acc {100 * accuracy:.2f}%"
            )


# ---------------------------------------------------------------------------------------- runs


def _fit(model, data, cfg, seed, epochs, callbacks):
    """Trains on the seeded training set, validating every epoch; returns (History, seconds)."""
    start = time.time()
    history = model.fit(
        _train_dataset(data, cfg, seed),
        shuffle=False,  # the dataset shuffles itself (seeded)
        epochs=epochs,
        validation_data=(data["x_eval"], data["y_eval"]),
        validation_batch_size=_EVAL_BATCH,
        callbacks=callbacks,
        verbose=0,
    )
    return history, time.time() - start


def run_sgd(seed, cfg, data, progress):
    """The SGD baseline (paper schedule, B epochs) and the Keras use_ema EMA of the same run."""
    keras.utils.set_random_seed(seed)
    model = _build(cfg, data)
    copy = _evaluation_copy(model)
    steps = math.ceil(len(data["x_train"]) / cfg["batch_size"])
    budget = cfg["budget"]
    lr = keras_swa.schedules.PaperSchedule(
        cfg["lr_init"], 0.01 * cfg["lr_init"], swa_start=budget * steps
    )
    optimizer = keras.optimizers.SGD(
        lr, momentum=cfg["momentum"], use_ema=True, ema_momentum=cfg["ema_momentum"]
    )
    _compile(model, optimizer)
    final = _FinalIterate(copy, data, budget, cfg["ece_bins"])
    progress.label, progress.epochs = f"[seed {seed}] SGD", budget
    history, train_time = _fit(model, data, cfg, seed, budget, [final, progress])
    curve = [float(a) for a in history.history["val_accuracy"]]
    out = {
        "sgd": {
            "eval_accuracy": curve[-1],
            "train_accuracy": final.train_accuracy,
            "epochs": budget,
            "nll": final.metrics["nll"],
            "ece": final.metrics["ece"],
            "predict_cost_ratio": 1.0,
        },
        "sgd_curve": curve,
        "sgd_train_loss": [float(v) for v in history.history["loss"]],
        "sgd_train_time_s": train_time,
    }
    # Keras' fit already swapped the EMA weights in at its end; doing it again is idempotent and
    # makes the protocol explicit. Keras averages only trainable weights: the BN statistics
    # are still those of the SGD iterates.
    optimizer.finalize_variable_values(model.trainable_variables)
    copy.set_weights(model.get_weights())
    out["ema"] = {
        "eval_accuracy": _accuracy(copy, data["x_eval"], data["y_eval"]),
        "train_accuracy": _accuracy(copy, data["x_train"], data["y_train"]),
        "epochs": budget,
    }
    keras_swa.update_bn(copy, data["x_train"], batch_size=_EVAL_BATCH, verbose=0)
    out["ema_bn"] = {
        "eval_accuracy": _accuracy(copy, data["x_eval"], data["y_eval"]),
        "train_accuracy": _accuracy(copy, data["x_train"], data["y_train"]),
        "epochs": budget,
    }
    return out


def run_swa(seed, cfg, data, progress, log):
    """ONE SWA run to 1.5 B epochs, evaluated (BN-fixed copy) at budgets 1, 1.25 and 1.5."""
    keras.utils.set_random_seed(seed)
    model = _build(cfg, data)
    copy = _evaluation_copy(model)
    steps = math.ceil(len(data["x_train"]) / cfg["batch_size"])
    start_epoch = cfg["swa_start_epoch"]
    swa_lr = cfg["swa_lr_ratio"] * cfg["lr_init"]
    cyclic = {}
    if cfg["cyclic"]:
        cyclic = {"swa_lr_min": cfg["swa_lr_ratio_min"] * cfg["lr_init"], "cycle_length": steps}
    lr = keras_swa.schedules.PaperSchedule(
        cfg["lr_init"], swa_lr, swa_start=start_epoch * steps, **cyclic
    )
    _compile(model, keras.optimizers.SGD(lr, momentum=cfg["momentum"]))
    swa = keras_swa.SWA(
        # One epoch later than the paper's code, which captures when (epoch + 1) >= swa_start
        # (the screen and the confirmation follow the paper): docs/presets.md.
        start_epoch=start_epoch,
        cycle_length=1,
        bn_data=data["x_train"],
        bn_batch_size=_EVAL_BATCH,
        verbose=0,
    )
    ensembles = _EnsembleCollector(swa, copy, data, cfg, log)
    evaluator = _SWAEvaluator(swa, copy, data, cfg, log)
    epochs = cfg["marks"]["1.5"]
    progress.label, progress.epochs = f"[seed {seed}] SWA", epochs
    history, train_time = _fit(
        model, data, cfg, seed, epochs, [swa, ensembles, evaluator, progress]
    )
    iterate_curve = [float(a) for a in history.history["val_accuracy"]]
    out = {f"swa_{key}": value for key, value in evaluator.at_marks.items()}
    out["swa_no_bn"] = evaluator.no_bn
    out["swa_1"]["predict_cost_ratio"] = 1.0
    out.update(ensembles.results)
    out["swa_run_iterate"] = {
        "eval_accuracy": iterate_curve[-1],
        "train_accuracy": None,
        "epochs": epochs,
    }
    out["swa_run_iterate_curve"] = iterate_curve
    out["swa_curve"] = {str(k): v for k, v in sorted(evaluator.curve.items())}
    out["swa_train_time_s"] = train_time
    out["swa_captures"] = int(swa.averaged.n_averaged.numpy())
    # The callback ends training by writing the averages into the model and recomputing BN: the
    # same weights as the copy evaluated at budget 1.5.
    out["swa_callback_final_eval_accuracy"] = _accuracy(model, data["x_eval"], data["y_eval"])
    return out


# ---------------------------------------------------------------------------------------- report


def _mean_std(values):
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def summarize_runs(per_seed, cfg):
    """Mean +- std per table row, and the paired SWA - SGD differences."""
    rows = []
    sgd = [r["sgd"]["eval_accuracy"] for r in per_seed]
    for key, method, multiple in ROWS:
        evals = [r[key]["eval_accuracy"] for r in per_seed]
        trains = [r[key]["train_accuracy"] for r in per_seed]
        row = {
            "key": key,
            "method": method,
            "budget": multiple,
            "epochs": per_seed[0][key]["epochs"],
            "eval_accuracy": _mean_std(evals),
            "train_accuracy": _mean_std(trains) if None not in trains else None,
            "minus_sgd_points": _mean_std([100 * (a - b) for a, b in zip(evals, sgd)]),
        }
        for metric in ("nll", "ece", "predict_cost_ratio"):
            if all(metric in r[key] for r in per_seed):
                row[metric] = _mean_std([r[key][metric] for r in per_seed])
        if key != "sgd":
            row["seeds_better_than_sgd"] = sum(a > b for a, b in zip(evals, sgd))
        rows.append(row)
    return rows


def _pct(stats):
    if stats is None:
        return "-"
    if len(stats["values"]) > 1:
        return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"
    return f"{100 * stats['mean']:.2f}"


def verdicts(rows, n_seeds):
    """One sentence per SWA budget: did SWA beat SGD (mean, and in how many seeds)?"""
    out = []
    for row in rows:
        if row["method"] != "SWA":
            continue
        diff = row["minus_sgd_points"]
        beat = diff["mean"] > 0
        out.append(
            f"Budget {row['budget']:g} ({row['epochs']} epochs): SWA "
            f"{'beat' if beat else 'did NOT beat'} SGD: {diff['mean']:+.2f} points on average "
            f"(better in {row['seeds_better_than_sgd']} of {n_seeds} seeds)."
        )
    return out


def make_table(rows, cfg, split, n_params, verdict_lines):
    split_name = split.capitalize()
    headers = [
        "method",
        "budget",
        "epochs",
        f"{split_name} accuracy (%)",
        f"{split_name} error (%)",
        "minus SGD (points)",
        "Train accuracy (%)",
    ]
    body = []
    for row in rows:
        acc = row["eval_accuracy"]
        err = {"mean": 1 - acc["mean"], "std": acc["std"], "values": acc["values"]}
        diff = row["minus_sgd_points"]
        body.append(
            [
                row["method"],
                f"{row['budget']:g}",
                row["epochs"],
                _pct(acc),
                _pct(err),
                "-" if row["key"] == "sgd" else f"{diff['mean']:+.2f}",
                _pct(row["train_accuracy"]),
            ]
        )
    title = (
        f"## SWA vs SGD: {cfg['dataset']}, {cfg['model']} width {cfg['width']} "
        f"({n_params:,} parameters)\n\n"
        f"Training subset {cfg['train_size'] or 'all'} images, budget B = {cfg['budget']} epochs, "
        f"SWA start epoch {cfg['swa_start_epoch']}, swa_lr = {cfg['swa_lr_ratio']:g} x lr_init "
        f"({'cyclic' if cfg['cyclic'] else 'constant'}), lr_init {cfg['lr_init']:g}, "
        f"weight decay {cfg['weight_decay']:g}, batch {cfg['batch_size']}, "
        f"{cfg['seeds']} seed(s) (mean ± std). Evaluated on the {split} split"
        f"{' (quick mode: the numbers mean nothing)' if cfg['quick'] else ''}.\n"
    )
    return (
        title
        + "\n"
        + bench.markdown_table(headers, body)
        + "\n\n"
        + "\n".join(f"- {line}" for line in verdict_lines)
        + "\n\n"
        + uncertainty_table(rows, cfg, split)
    )


def _stat(stats, scale=1.0, digits=2):
    if stats is None:
        return "-"
    if len(stats["values"]) > 1:
        return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f}"


def uncertainty_table(rows, cfg, split):
    """SGD, SWA, SWAG and FGE at budget 1: accuracy, NLL, calibration, prediction cost."""
    by_key = {row["key"]: row for row in rows}
    body = []
    for key in UNCERTAINTY_ROWS:
        row = by_key[key]
        body.append(
            [
                row["method"],
                _pct(row["eval_accuracy"]),
                _stat(row.get("nll"), digits=4),
                _stat(row.get("ece"), scale=100),
                _stat(row.get("predict_cost_ratio"), digits=1),
            ]
        )
    split_name = split.capitalize()
    headers = [
        "method (budget 1)",
        f"{split_name} accuracy (%)",
        "NLL (nats)",
        f"ECE (%, {cfg['ece_bins']} bins)",
        "prediction time (x one model)",
    ]
    note = (
        f"SWAG: {cfg['swag_samples']} draws (scale {cfg['swag_scale']:g}, rank up to "
        f"{cfg['swag_rank']}), BatchNorm recomputed for every draw, probabilities averaged; "
        "its prediction time includes those BN passes. FGE: every snapshot the SWA run "
        f"captured by budget 1 ({'cyclic' if cfg['cyclic'] else 'constant'} swa_lr; the FGE "
        "paper uses a cyclic one), each with its own BN statistics, probabilities averaged. "
        "All from the same SWA run and the same snapshots."
    )
    return (
        "### Uncertainty and cost at budget 1\n\n"
        + bench.markdown_table(headers, body)
        + "\n\n"
        + note
        + "\n"
    )


def make_plot(path, per_seed, cfg, split):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    sgd = np.mean([r["sgd_curve"] for r in per_seed], axis=0)
    iterate = np.mean([r["swa_run_iterate_curve"] for r in per_seed], axis=0)
    swa_epochs = sorted(int(e) for e in per_seed[0]["swa_curve"])
    swa = [np.mean([r["swa_curve"][str(e)] for r in per_seed]) for e in swa_epochs]
    ax.plot(range(1, len(sgd) + 1), 100 * (1 - sgd), label="SGD (paper schedule, budget B)")
    ax.plot(
        range(1, len(iterate) + 1),
        100 * (1 - iterate),
        label="SWA run: SGD iterate",
        alpha=0.6,
    )
    ax.plot(swa_epochs, 100 * (1 - np.asarray(swa)), "o-", markersize=3, label="SWA (BN-fixed)")
    start = cfg["swa_start_epoch"]
    ax.axvline(start, color="#c44e52", linestyle="--", linewidth=1, label="SWA start")
    low = min(np.min(100 * (1 - sgd)), np.min(100 * (1 - np.asarray(swa))))
    tail = np.concatenate([100 * (1 - sgd[len(sgd) // 3 :]), 100 * (1 - iterate[len(iterate) // 3 :])])
    ax.set_ylim(max(0.0, low - 1.0), max(low + 2.0, float(np.percentile(tail, 95)) + 1.0))
    for key, epoch in cfg["marks"].items():
        ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        ax.text(epoch, ax.get_ylim()[1], f" {key} B", va="top", fontsize=8, color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} error (%)")
    ax.set_title(
        f"{cfg['dataset']} {cfg['model']} w{cfg['width']}, {cfg['seeds']} seed(s): "
        f"{split} error vs epoch"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resolve_screen_config():
    """The screen's configuration: its own defaults (a fast cnn, 5000 + 5000 images, B = 20)."""
    bench.validate_common_flags()
    cfg = {
        "mode": "screen",
        "quick": FLAGS.quick,
        "dataset": FLAGS.dataset,
        "data_dir": FLAGS.data_dir,
        "model": FLAGS.model if FLAGS["model"].present else "cnn",
        "width": _default(FLAGS.width, 16, 4),
        "train_size": _default(FLAGS.train_size, 5000, 256),
        "validation_size": FLAGS.validation_size or (256 if FLAGS.quick else 5000),
        "budget": _default(FLAGS.budget, 20, 5),
        "batch_size": FLAGS.batch_size if not FLAGS.quick else min(FLAGS.batch_size, 64),
        "seeds": _default(FLAGS.seeds, 2, 2),
        "first_seed": FLAGS.first_seed,
        "data_seed": FLAGS.data_seed,
        "num_classes": _NUM_CLASSES[FLAGS.dataset],
        "regimes": list(FLAGS.screen_regimes),
    }
    known = [r["name"] for r in screening.REGIMES]
    if not cfg["regimes"] or any(r not in known for r in cfg["regimes"]):
        raise app.UsageError(
            f"`--screen_regimes` must name regimes among {known}. "
            f"Received: screen_regimes={cfg['regimes']}"
        )
    for key in ("width", "train_size", "validation_size", "batch_size", "seeds"):
        if cfg[key] < 1:
            raise app.UsageError(f"`--{key}` must be a positive integer. Received: {key}={cfg[key]}")
    if cfg["budget"] < 5:
        raise app.UsageError(
            f"`--budget` must be at least 5 epochs in the screen. Received: budget={cfg['budget']}"
        )
    return cfg


def main_screen():
    cfg = resolve_screen_config()
    tf.get_logger().setLevel("ERROR")
    start = time.time()
    data = screening.load_screen_data(cfg, *_STATS[cfg["dataset"]])
    seeds = list(range(cfg["first_seed"], cfg["first_seed"] + cfg["seeds"]))
    out = screening.run_screen(dict(cfg, seeds=seeds), data, log=lambda m: print(m, flush=True))
    wall = time.time() - start
    table = screening.screen_table(out, cfg)
    command = bench.command_line("benchmarks." + NAME)
    table += f"\nWall time {wall / 60:.1f} min. Command: `{command}`\n"
    payload = {"benchmark": NAME + " (screen)", "command": command, "versions": bench.versions(),
               "config": cfg, "wall_time_s": wall, **out}
    import json

    os.makedirs(FLAGS.output_dir, exist_ok=True)
    payload["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload["machine"] = bench.machine_info()
    for ext, text in (("json", json.dumps(payload, indent=2) + "\n"), ("md", table)):
        with open(os.path.join(FLAGS.output_dir, f"accuracy_screen.{ext}"), "w") as f:
            f.write(text)
    print(table, flush=True)


def main_confirm():
    import json

    cfg = resolve_screen_config()
    cfg["mode"] = "confirm"
    cfg.pop("validation_size")
    cfg["test_size"] = _default(FLAGS.test_size, 0, 256)
    cfg["seeds"] = list(range(FLAGS.first_seed, FLAGS.first_seed + _default(FLAGS.seeds, 3, 2)))
    with open(FLAGS.screen_results, encoding="utf-8") as f:
        screen = json.load(f)
    name = FLAGS.configuration or screen["chosen"]
    if name is None:
        raise app.UsageError(
            f"The screen in {FLAGS.screen_results} chose no configuration (none met its rule); "
            "pass --configuration NAME to confirm one anyway. Received: configuration=None"
        )
    chosen = [c for c in screen["configurations"] if c["name"] == name]
    if not chosen:
        raise app.UsageError(
            f"No configuration named {name!r} in {FLAGS.screen_results}: it has "
            f"{[c['name'] for c in screen['configurations']]}. Received: configuration={name!r}"
        )
    chosen = dict(chosen[0], chosen_by_rule=name == screen["chosen"])
    tf.get_logger().setLevel("ERROR")
    start = time.time()
    data = screening.load_screen_data(dict(cfg, validation_size=0), *_STATS[cfg["dataset"]])
    _, (x_test, y_test) = data_lib.load_dataset(cfg["dataset"], cfg["data_dir"])
    if cfg["test_size"]:
        keep = np.sort(np.random.RandomState(cfg["data_seed"] + 1).permutation(len(x_test))
                       [: cfg["test_size"]])
        x_test, y_test = x_test[keep], y_test[keep]
    cfg["test_size"] = len(x_test)
    data["x_eval"] = data_lib.standardize(x_test, *_STATS[cfg["dataset"]])
    data["y_eval"] = y_test
    out = confirm.run_confirm(cfg, data, chosen, log=lambda m: print(m, flush=True))
    wall = time.time() - start
    table = confirm.confirm_table(out, cfg)
    if not chosen["chosen_by_rule"]:
        table += "\nThis configuration was NOT the screen's rule-based choice (--configuration).\n"
    command = bench.command_line("benchmarks." + NAME)
    table += f"\nWall time {wall / 60:.1f} min. Command: `{command}`\n"
    payload = {"benchmark": NAME + " (confirm)", "command": command,
               "versions": bench.versions(), "config": cfg, "wall_time_s": wall,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": bench.machine_info(), **out}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    for ext, text in (("json", json.dumps(payload, indent=2, default=str) + "\n"), ("md", table)):
        with open(os.path.join(FLAGS.output_dir, f"accuracy_confirm.{ext}"), "w") as f:
            f.write(text)
    print(table, flush=True)


def main(_):
    if FLAGS.mode == "screen":
        return main_screen()
    if FLAGS.mode == "confirm":
        return main_confirm()
    cfg = resolve_config()
    # keras_swa.update_bn builds its pass function per call: silence TF's retracing warnings.
    tf.get_logger().setLevel("ERROR")
    job_start = time.time()

    def log(message):
        print(message, flush=True)

    data = prepare_data(cfg)
    split = data["eval_split"]
    n_params = int(sum(np.prod(v.shape) for v in _build(cfg, data).trainable_weights))
    log(
        f"{cfg['dataset']}: {len(data['x_train'])} training images, {len(data['x_eval'])} "
        f"{split} images; {cfg['model']} width {cfg['width']}: {n_params:,} parameters; "
        f"SGD budget {cfg['budget']} epochs, SWA from epoch {cfg['swa_start_epoch']} to "
        f"{cfg['marks']['1.5']}; {cfg['seeds']} seed(s)."
    )
    seeds = list(range(cfg["first_seed"], cfg["first_seed"] + cfg["seeds"]))
    progress = Progress(len(seeds) * (cfg["budget"] + cfg["marks"]["1.5"]), split)
    per_seed = []
    for seed in seeds:
        result = {"seed": seed}
        result.update(run_sgd(seed, cfg, data, progress))
        log(f"[seed {seed}] SGD: {split} acc {100 * result['sgd']['eval_accuracy']:.2f}%")
        result.update(run_swa(seed, cfg, data, progress, log))
        per_seed.append(result)
    rows = summarize_runs(per_seed, cfg)
    verdict_lines = verdicts(rows, len(seeds))
    table = make_table(rows, cfg, split, n_params, verdict_lines)
    wall = time.time() - job_start
    table += f"\nWall time {wall / 60:.1f} min. Command: `{bench.command_line('benchmarks.' + NAME)}`\n"
    payload = {
        "benchmark": NAME,
        "command": bench.command_line("benchmarks." + NAME),
        "versions": bench.versions(),
        "config": cfg,
        "eval_split": split,
        "num_train": len(data["x_train"]),
        "num_eval": len(data["x_eval"]),
        "num_parameters": n_params,
        "rows": rows,
        "verdicts": verdict_lines,
        "per_seed": per_seed,
        "wall_time_s": wall,
        "notes": [
            "SGD: PaperSchedule(lr_init, 0.01 lr_init, swa_start=B epochs), momentum SGD, L2 "
            "kernel penalty with gradient weight_decay * w.",
            "SWA rows: one run to 1.5 B; at each mark the averages are assigned to a cloned "
            "model, keras_swa.update_bn recomputes its BN statistics on the training images "
            "(no augmentation), and the clone is evaluated; training is not disturbed.",
            "SWA without BN recompute: the averages with the BN moving statistics of the SWA "
            "run's current iterate at budget 1.",
            "EMA: the SGD run's optimizer has use_ema=True (ema_momentum as configured, "
            "ema_overwrite_frequency=None, so training is unchanged); after fit, "
            "optimizer.finalize_variable_values(model.trainable_variables) puts the EMA weights "
            "in. Keras' EMA covers trainable weights only, so the 'EMA' row keeps the SGD run's "
            "BN statistics; 'EMA + update_bn' recomputes them with keras_swa.update_bn.",
            f"Numbers are on the {split} split; tune only with --validation_size, never on test.",
        ],
    }
    paths = bench.write_results(NAME, payload, table, lambda p: make_plot(p, per_seed, cfg, split))
    print(table, flush=True)
    log(f"Wrote {paths['json']}, {paths['md']}, {paths['png']} in {wall / 60:.1f} min.")


if __name__ == "__main__":
    app.run(main)
