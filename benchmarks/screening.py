"""Screening for the accuracy benchmark: which regime shows what SWA does, on validation only.

`python -m benchmarks.accuracy_benchmark --mode=screen` runs this. It never reads the test files:
the training images are split into a training subset and a disjoint validation split, and every
number here is on those (tests/test_screening.py runs it with unreadable test files).

Protocol, fixed before any screening run:

1. Regimes: crop+flip augmentation (2-pixel padding, Fashion-MNIST's 28x28) on or off. Fixed
   inside the paper's rules: weight decay on every parameter (torch's `weight_decay`), BatchNorm
   momentum 0.9 (torch's 0.1), batch 128, momentum 0.9, SGD budget B, the paper's schedule.
2. SGD first: for each regime, `lr_init` in `SGD_LR_INIT` and weight decay in `SGD_WEIGHT_DECAY`
   are tried with the first seed at budget B; the best validation accuracy wins, and both arms
   of that regime use it.
3. Saturation: SGD trained with its own schedule for 1.5 B epochs is compared with SGD at B, per
   seed. A regime is saturated if the mean gain of 1.5 B over B is at most
   `SATURATION_POINTS` (0.10) points. In a regime that is not, more epochs alone help SGD, and an
   SWA gain there says little about SWA.
4. SWA configurations in each regime: swa_lr / lr_init in {0.2, 0.5} x captures once per epoch
   or 4 times per epoch (`SWA(cycle_unit="step")`), SWA start S = 0.8 B with the first capture
   after S epochs (the paper code's `(epoch + 1) >= swa_start`), evaluated at budget 1 (B epochs)
   with BatchNorm recomputed on the training subset.
5. Decision rule (`choose`): among configurations of saturated regimes whose paired
   SWA - SGD validation gain at budget 1 is positive in every screening seed, the largest mean
   gain. If none qualifies, no configuration is chosen, and the result says so.

Each arm forks from the SGD run of its seed where their schedules first differ
(`benchmarks.training`): epoch floor(0.5 S) for SWA, floor(0.5 B) would do for SGD at 1.5 B.

Diagnostics per configuration (why a gain shows or not): SWA minus its own run's final iterate;
the spread of the captures (mean distance from their average over the average's norm, trainable
weights); the snapshot ensemble (every epoch-end iterate of the SWA phase with its own BN
statistics) minus its members' mean accuracy; the final training cross-entropy (no
regularization, no augmentation) of SGD and SWA.

Outputs: `accuracy_screen.json` (every configuration, seed and number, the protocol, the choice)
and `accuracy_screen.md` in `--output_dir`.
"""

import math
import statistics
import time

import numpy as np

import keras_swa
from benchmarks import training
from keras_swa.backend import keras

__all__ = [
    "DECISION_RULE",
    "SATURATION_POINTS",
    "SGD_LR_INIT",
    "SGD_WEIGHT_DECAY",
    "SWA_CONFIGS",
    "REGIMES",
    "choose",
    "load_screen_data",
    "run_screen",
    "screen_table",
    "swa_callback",
]

REGIMES = ({"name": "crop_flip", "augment_pad": 2}, {"name": "none", "augment_pad": 0})
SGD_LR_INIT = (0.05, 0.1)
SGD_WEIGHT_DECAY = (5e-4,)
# (swa_lr / lr_init, captures per epoch)
SWA_CONFIGS = ((0.2, 1), (0.5, 1), (0.2, 4), (0.5, 4))
SATURATION_POINTS = 0.10
DECISION_RULE = (
    "Among configurations of saturated regimes (mean validation gain of SGD at 1.5 B over SGD "
    f"at B at most {SATURATION_POINTS:.2f} points) whose paired SWA - SGD validation gain at "
    "budget 1 is positive in every screening seed, choose the largest mean gain; if none "
    "qualifies, choose none and say so."
)


def load_screen_data(cfg, mean, std):
    """The training subset and the validation split, both from the training files only."""
    from benchmarks import data as data_lib

    if cfg["dataset"] != "fashion_mnist":
        raise ValueError(
            "The screen runs on Fashion-MNIST (its training files only). "
            f"Received: dataset={cfg['dataset']!r}"
        )
    ((x, y),) = data_lib.load_fashion_mnist(cfg["data_dir"], splits=("train",))
    n_train, n_val = cfg["train_size"], cfg["validation_size"]
    if n_train + n_val > len(x):
        raise ValueError(
            f"`--train_size` + `--validation_size` exceed the {len(x)} training images. "
            f"Received: train_size={n_train}, validation_size={n_val}"
        )
    order = np.random.RandomState(cfg["data_seed"]).permutation(len(x))
    train, val = order[:n_train], order[n_train : n_train + n_val]
    return {
        "x_train": data_lib.standardize(x[train], mean, std),
        "y_train": y[train],
        "x_val": data_lib.standardize(x[val], mean, std),
        "y_val": y[val],
    }


def swa_callback(swa_start, per_epoch, steps, bn_data):
    """`keras_swa.SWA` capturing `per_epoch` times an epoch, first after `swa_start` epochs.

    The paper's code captures when `(epoch + 1) >= swa_start`, so the first capture ends epoch
    index `swa_start - 1`; more captures per epoch are step cycles of `steps // per_epoch`.
    """
    common = dict(bn_data=bn_data, bn_batch_size=1000, verbose=0)
    if per_epoch == 1:
        return keras_swa.SWA(start_epoch=swa_start - 1, **common)
    return keras_swa.SWA(start_step=(swa_start - 1) * steps, cycle_unit="step",
                         cycle_length=max(1, steps // per_epoch), **common)


def _accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _evaluate(run, data):
    val = run.predict(data["x_val"])
    train = run.predict(data["x_train"])
    return {
        "val_accuracy": _accuracy(val, data["y_val"]),
        "train_accuracy": _accuracy(train, data["y_train"]),
        "train_cross_entropy": training.cross_entropy(train, data["y_train"]),
    }


class _Diagnostics(keras.callbacks.Callback):
    """Records the captures, the epoch-end iterates' predictions and the final iterate.

    Must come after the `keras_swa.SWA` callback (its capture of a batch or epoch is done).
    """

    def __init__(self, swa, data, run, swa_first_epoch, last_epoch):
        super().__init__()
        self.swa, self.data, self.run = swa, data, run
        self.first, self.last = swa_first_epoch, last_epoch
        self.captures, self.member_logits, self.seen = [], [], 0
        self.final_iterate = None

    def _check(self):
        averaged = self.swa.averaged
        n = int(averaged.n_averaged.numpy()) if averaged is not None else 0
        if n > self.seen:
            self.seen = n
            self.captures.append(
                np.concatenate([np.ravel(v.numpy()) for v in self.model.trainable_variables])
            )

    def on_train_batch_end(self, batch, logs=None):
        self._check()

    def on_epoch_end(self, epoch, logs=None):
        self._check()
        if epoch >= self.first:
            self.member_logits.append(self.run.predict(self.data["x_val"]))
        if epoch == self.last:
            # The SWA callback writes the averages in at on_train_end: evaluate the iterate now.
            self.final_iterate = _evaluate(self.run, self.data)

    def summary(self):
        captures = np.stack(self.captures)
        mean = captures.mean(axis=0)
        spread = float(np.mean(np.linalg.norm(captures - mean, axis=1)) / np.linalg.norm(mean))
        y = self.data["y_val"]
        members = [_accuracy(l, y) for l in self.member_logits]
        ensemble = _accuracy(np.mean([_softmax(l) for l in self.member_logits], axis=0), y)
        return {
            "captures": len(self.captures),
            "capture_spread": spread,
            "snapshot_members": len(members),
            "snapshot_ensemble_gain_points": 100 * (ensemble - statistics.fmean(members)),
            "final_iterate": self.final_iterate,
        }


def _mean_std(values):
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _sgd_run(spec, data, seed, budget, trunk_epochs):
    run = training.Run(spec, data["x_train"], data["y_train"], seed, total_epochs=budget)
    run.fit(0, trunk_epochs)
    trunk = run.snapshot()
    start = time.time()
    run.fit(trunk_epochs, budget)
    result = _evaluate(run, data)
    result["train_loss_curve"] = run.history["loss"]
    return result, trunk, time.time() - start


def run_screen(cfg, data, log=print):
    """Runs the whole screen. Returns the JSON-ready results (regimes, configurations, choice)."""
    budget, seeds = cfg["budget"], cfg["seeds"]
    swa_start = int(round(0.8 * budget))
    trunk_epochs = swa_start // 2
    long_budget = int(round(1.5 * budget))
    steps = math.ceil(len(data["x_train"]) / cfg["batch_size"])
    base = dict(model=cfg["model"], width=cfg["width"], num_classes=cfg["num_classes"],
                batch_size=cfg["batch_size"], weight_decay_scope="all", bn_momentum=0.9)
    out = {"regimes": [], "configurations": []}
    regimes = [r for r in REGIMES if r["name"] in cfg.get("regimes", [r["name"] for r in REGIMES])]
    for regime in regimes:
        log(f"== regime augment={regime['name']}: tuning SGD on seed {seeds[0]}")
        tuning = []
        for lr_init in SGD_LR_INIT:
            for wd in SGD_WEIGHT_DECAY:
                spec = training.RunSpec(lr_init=lr_init, weight_decay=wd,
                                        augment_pad=regime["augment_pad"], **base)
                result, trunk, _ = _sgd_run(spec, data, seeds[0], budget, trunk_epochs)
                tuning.append({"lr_init": lr_init, "weight_decay": wd, "spec": spec,
                               "result": result, "trunk": trunk})
                log(f"   SGD lr_init {lr_init:g} wd {wd:g}: val "
                    f"{100 * result['val_accuracy']:.2f}%")
        best = max(tuning, key=lambda t: t["result"]["val_accuracy"])
        spec = best["spec"]
        sgd, sgd_long, arms = {}, {}, {c: {} for c in SWA_CONFIGS}
        for seed in seeds:
            if seed == seeds[0]:
                sgd[seed], trunk = best["result"], best["trunk"]
            else:
                sgd[seed], trunk, _ = _sgd_run(spec, data, seed, budget, trunk_epochs)
            run = training.Run(spec, data["x_train"], data["y_train"], seed, long_budget)
            run.restore(trunk)
            run.fit(trunk_epochs, long_budget)
            sgd_long[seed] = _evaluate(run, data)
            log(f"   [seed {seed}] SGD B {100 * sgd[seed]['val_accuracy']:.2f}%, SGD 1.5 B "
                f"{100 * sgd_long[seed]['val_accuracy']:.2f}%")
            for ratio, per_epoch in SWA_CONFIGS:
                schedule = keras_swa.schedules.PaperSchedule(
                    spec.lr_init, ratio * spec.lr_init, swa_start=swa_start * steps
                )
                run = training.Run(spec, data["x_train"], data["y_train"], seed, budget,
                                   schedule=schedule)
                run.restore(trunk)
                swa = swa_callback(swa_start, per_epoch, steps, data["x_train"])
                diag = _Diagnostics(swa, data, run, swa_start - 1, budget - 1)
                run.fit(trunk_epochs, budget, [swa, diag])
                result = _evaluate(run, data)
                result.update(diag.summary())
                arms[(ratio, per_epoch)][seed] = result
                log(f"   [seed {seed}] SWA ratio {ratio:g}, {per_epoch}/epoch "
                    f"({result['captures']} captures): val {100 * result['val_accuracy']:.2f}%")
        long_gain = _mean_std([100 * (sgd_long[s]["val_accuracy"] - sgd[s]["val_accuracy"])
                               for s in seeds])
        saturated = long_gain["mean"] <= SATURATION_POINTS
        out["regimes"].append({
            "augment": regime["name"],
            "augment_pad": regime["augment_pad"],
            "sgd_tuning": [{"lr_init": t["lr_init"], "weight_decay": t["weight_decay"],
                            "val_accuracy": t["result"]["val_accuracy"]} for t in tuning],
            "lr_init": spec.lr_init,
            "weight_decay": spec.weight_decay,
            "sgd": {str(s): sgd[s] for s in seeds},
            "sgd_1.5B": {str(s): sgd_long[s] for s in seeds},
            "sgd_1.5B_minus_B_points": long_gain,
            "saturated": saturated,
        })
        for (ratio, per_epoch), by_seed in arms.items():
            gains = [100 * (by_seed[s]["val_accuracy"] - sgd[s]["val_accuracy"]) for s in seeds]
            iterate = [100 * (by_seed[s]["val_accuracy"]
                              - by_seed[s]["final_iterate"]["val_accuracy"]) for s in seeds]
            out["configurations"].append({
                "name": f"augment={regime['name']} swa_lr={ratio:g}x captures={per_epoch}/epoch",
                "augment": regime["name"],
                "swa_lr_ratio": ratio,
                "captures_per_epoch": per_epoch,
                "lr_init": spec.lr_init,
                "weight_decay": spec.weight_decay,
                "regime_saturated": saturated,
                "swa_minus_sgd_points": _mean_std(gains),
                "seeds_positive": sum(g > 0 for g in gains),
                "swa_minus_own_iterate_points": _mean_std(iterate),
                "capture_spread": _mean_std([by_seed[s]["capture_spread"] for s in seeds]),
                "snapshot_ensemble_gain_points": _mean_std(
                    [by_seed[s]["snapshot_ensemble_gain_points"] for s in seeds]),
                "swa_train_cross_entropy": _mean_std(
                    [by_seed[s]["train_cross_entropy"] for s in seeds]),
                "sgd_train_cross_entropy": _mean_std(
                    [sgd[s]["train_cross_entropy"] for s in seeds]),
                "captures": by_seed[seeds[0]]["captures"],
                "per_seed": {str(s): by_seed[s] for s in seeds},
            })
    out["chosen"] = choose(out["configurations"], len(seeds))
    out["protocol"] = {
        "decision_rule": DECISION_RULE,
        "sgd_lr_init": list(SGD_LR_INIT),
        "sgd_weight_decay": list(SGD_WEIGHT_DECAY),
        "swa_configs": [list(c) for c in SWA_CONFIGS],
        "swa_start_epochs": swa_start,
        "first_capture_after_epochs": swa_start,
        "trunk_epochs": trunk_epochs,
        "sgd_long_epochs": long_budget,
        "weight_decay_scope": "all",
        "bn_momentum": 0.9,
    }
    return out


def choose(configurations, n_seeds):
    """The decision rule: the chosen configuration's name, or `None` if none qualifies.

    Example:

    ```python
    from benchmarks import screening
    good = {"name": "a", "regime_saturated": True, "seeds_positive": 2,
            "swa_minus_sgd_points": {"mean": 0.4}}
    noisy = dict(good, name="b", seeds_positive=1, swa_minus_sgd_points={"mean": 0.9})
    assert screening.choose([good, noisy], n_seeds=2) == "a"
    assert screening.choose([noisy], n_seeds=2) is None
    ```
    """
    eligible = [
        c for c in configurations
        if c["regime_saturated"] and c["seeds_positive"] == n_seeds
        and c["swa_minus_sgd_points"]["mean"] > 0
    ]
    if not eligible:
        return None
    return max(eligible, key=lambda c: c["swa_minus_sgd_points"]["mean"])["name"]


def _pm(stats, digits=2, scale=1.0):
    return f"{scale * stats['mean']:+.{digits}f} ± {scale * stats['std']:.{digits}f}"


def screen_table(out, cfg):
    """The markdown report: protocol, SGD per regime, every configuration, the choice."""
    lines = [
        f"## Accuracy benchmark screen (validation split only): {cfg['dataset']}, "
        f"{cfg['model']} width {cfg['width']}",
        "",
        f"Training subset {cfg['train_size']} images, validation {cfg['validation_size']} "
        f"images carved from the training set (the test files are never read), budget "
        f"B = {cfg['budget']} epochs, seeds {cfg['seeds']}"
        f"{' (quick mode: the numbers mean nothing)' if cfg['quick'] else ''}.",
        "",
        f"Decision rule (fixed before the run): {DECISION_RULE}",
        "",
        "### SGD per regime",
        "",
        "| augment | SGD tuning (lr_init, wd: val %) | chosen lr_init, wd | SGD at B (val %) "
        "| SGD at 1.5 B minus B (points) | saturated |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["regimes"]:
        tuning = "; ".join(f"{t['lr_init']:g}, {t['weight_decay']:g}: "
                           f"{100 * t['val_accuracy']:.2f}" for t in r["sgd_tuning"])
        sgd = _mean_std([v["val_accuracy"] for v in r["sgd"].values()])
        lines.append(
            f"| {r['augment']} | {tuning} | {r['lr_init']:g}, {r['weight_decay']:g} | "
            f"{100 * sgd['mean']:.2f} ± {100 * sgd['std']:.2f} | "
            f"{_pm(r['sgd_1.5B_minus_B_points'])} | {'yes' if r['saturated'] else 'NO'} |"
        )
    lines += [
        "",
        "### SWA configurations at budget 1 (paired with SGD of the same seed)",
        "",
        "| configuration | captures | SWA − SGD (points) | seeds positive | SWA − own final "
        "iterate (points) | capture spread (x1e-3) | snapshot ensemble − members (points) | "
        "train CE SWA / SGD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in out["configurations"]:
        lines.append(
            f"| {c['name']} | {c['captures']} | {_pm(c['swa_minus_sgd_points'])} | "
            f"{c['seeds_positive']}/{cfg['seeds']} | {_pm(c['swa_minus_own_iterate_points'])} | "
            f"{1000 * c['capture_spread']['mean']:.2f} | "
            f"{_pm(c['snapshot_ensemble_gain_points'])} | "
            f"{c['swa_train_cross_entropy']['mean']:.4f} / "
            f"{c['sgd_train_cross_entropy']['mean']:.4f} |"
        )
    chosen = out["chosen"]
    lines += [
        "",
        f"**Chosen by the rule:** {chosen}" if chosen else
        "**Chosen by the rule:** none. No configuration of a saturated regime gained in every "
        "seed; the diagnostics above say why.",
        "",
    ]
    return "\n".join(lines)
