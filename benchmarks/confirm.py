"""The confirmation run: the configuration the screen chose, on the test split, once.

`python -m benchmarks.accuracy_benchmark --mode=confirm` runs this after the screen
(`--mode=screen`, benchmarks/screening.py) has chosen a configuration by its pre-registered rule;
`--screen_results` names the screen's JSON. Nothing here is tuned: the regime (augmentation,
`lr_init`, weight decay), `swa_lr` and the capture frequency come from the screen's choice, the
seeds are new to the test split, and the test set is evaluated once per model.

For each seed, from one shared trunk (benchmarks/training.py; forks are bit-identical):

- SGD with its own paper schedule for B, 1.25 B and 1.5 B epochs (a regime where more epochs alone
  help SGD must be compared at equal epochs too);
- ONE SWA run to 1.5 B epochs, its averages evaluated at B, 1.25 B and 1.5 B on a copy with
  BatchNorm recomputed on the training subset (training is not disturbed), and at B with the
  BatchNorm statistics of the run's own iterate (the ablation);
- paired differences (mean ± std over seeds) and seeds-better counts, SWA at each budget against
  SGD at B and against SGD at the same number of epochs.
"""

import math
import time

import keras_swa
from benchmarks import screening
from benchmarks import training
from keras_swa.backend import keras

__all__ = ["MARKS", "TARGET_POINTS", "run_confirm", "confirm_table"]

MARKS = ("1", "1.25", "1.5")
# The target: SWA ahead of SGD at every budget on the mean, by at least this at 1.5 B
# and in every seed there.
TARGET_POINTS = 0.3


class _MarkEvaluator(keras.callbacks.Callback):
    """At the budget marks: the BN-fixed averages (and at B the no-recompute ablation) on test."""

    def __init__(self, swa, copy, data, marks):
        super().__init__()
        self.swa, self.copy, self.data = swa, copy, data
        self.marks = {epochs: key for key, epochs in marks.items()}
        self.results = {}

    def on_epoch_end(self, epoch, logs=None):
        key = self.marks.get(epoch + 1)
        if key is None:
            return
        d, averaged = self.data, self.swa.averaged
        out = {"captures": int(averaged.n_averaged.numpy())}
        if key == "1":
            self.copy.set_weights(self.model.get_weights())
            averaged.assign_to(self.copy)
            out["no_bn_recompute"] = screening._accuracy(self.copy.predict(d["x_eval"], 1000, verbose=0),
                                          d["y_eval"])
            out["iterate"] = screening._accuracy(self.model.predict(d["x_eval"], 1000, verbose=0), d["y_eval"])
        averaged.assign_to(self.copy)
        keras_swa.update_bn(self.copy, d["x_train"], batch_size=1000, verbose=0)
        out["swa"] = screening._accuracy(self.copy.predict(d["x_eval"], 1000, verbose=0), d["y_eval"])
        self.results[key] = out


def run_confirm(cfg, data, chosen, log=print):
    """Runs the chosen configuration (a screen `configurations` entry) on `data["x_eval"]`."""
    budget = cfg["budget"]
    marks = {k: int(round(float(k) * budget)) for k in MARKS}
    swa_start = int(round(0.8 * budget))
    trunk_epochs = swa_start // 2
    steps = math.ceil(len(data["x_train"]) / cfg["batch_size"])
    pad = {r["name"]: r["augment_pad"] for r in screening.REGIMES}[chosen["augment"]]
    spec = training.RunSpec(
        model=cfg["model"], width=cfg["width"], num_classes=cfg["num_classes"],
        batch_size=cfg["batch_size"], lr_init=chosen["lr_init"],
        weight_decay=chosen["weight_decay"], weight_decay_scope="all", bn_momentum=0.9,
        augment_pad=pad,
    )
    per_seed = []
    for seed in cfg["seeds"]:
        start = time.time()
        trunk_run = training.Run(spec, data["x_train"], data["y_train"], seed, budget)
        trunk_run.fit(0, trunk_epochs)
        trunk = trunk_run.snapshot()
        result = {"seed": seed, "sgd": {}}
        for key, epochs in marks.items():
            run = training.Run(spec, data["x_train"], data["y_train"], seed, epochs)
            run.restore(trunk)
            run.fit(trunk_epochs, epochs)
            result["sgd"][key] = screening._accuracy(run.predict(data["x_eval"]), data["y_eval"])
        schedule = keras_swa.schedules.PaperSchedule(
            spec.lr_init, chosen["swa_lr_ratio"] * spec.lr_init, swa_start=swa_start * steps
        )
        run = training.Run(spec, data["x_train"], data["y_train"], seed, budget, schedule)
        run.restore(trunk)
        swa = screening.swa_callback(swa_start, chosen["captures_per_epoch"], steps,
                                     data["x_train"])
        copy = keras.models.clone_model(run.model)
        evaluator = _MarkEvaluator(swa, copy, data, marks)
        run.fit(trunk_epochs, marks["1.5"], [swa, evaluator])
        result["swa"] = evaluator.results
        result["seconds"] = time.time() - start
        per_seed.append(result)
        log(f"[seed {seed}] SGD " + ", ".join(f"{k} B {100 * v:.2f}%" for k, v in
                                             result["sgd"].items())
            + "; SWA " + ", ".join(f"{k} B {100 * v['swa']:.2f}%" for k, v in
                                   result["swa"].items()))
    rows = []
    for key in MARKS:
        swa = [r["swa"][key]["swa"] for r in per_seed]
        vs_b = [100 * (s - r["sgd"]["1"]) for s, r in zip(swa, per_seed)]
        vs_same = [100 * (s - r["sgd"][key]) for s, r in zip(swa, per_seed)]
        rows.append({
            "budget": key, "epochs": marks[key],
            "captures": per_seed[0]["swa"][key]["captures"],
            "sgd": screening._mean_std([r["sgd"][key] for r in per_seed]),
            "swa": screening._mean_std(swa),
            "swa_minus_sgd_B_points": screening._mean_std(vs_b),
            "swa_minus_sgd_same_epochs_points": screening._mean_std(vs_same),
            "seeds_better_than_sgd_B": sum(v > 0 for v in vs_b),
            "seeds_better_than_sgd_same_epochs": sum(v > 0 for v in vs_same),
        })
    ablation = {
        "swa_no_bn_recompute": screening._mean_std([r["swa"]["1"]["no_bn_recompute"] for r in per_seed]),
        "swa_run_iterate": screening._mean_std([r["swa"]["1"]["iterate"] for r in per_seed]),
    }
    last = rows[-1]
    met = (all(r["swa_minus_sgd_B_points"]["mean"] > 0 for r in rows)
           and last["swa_minus_sgd_B_points"]["mean"] >= TARGET_POINTS
           and last["seeds_better_than_sgd_B"] == len(per_seed))
    met_same = (all(r["swa_minus_sgd_same_epochs_points"]["mean"] > 0 for r in rows)
                and last["swa_minus_sgd_same_epochs_points"]["mean"] >= TARGET_POINTS
                and last["seeds_better_than_sgd_same_epochs"] == len(per_seed))
    return {"rows": rows, "ablation_at_B": ablation, "per_seed": per_seed,
            "target_met": met, "target_met_against_sgd_same_epochs": met_same,
            "chosen": chosen, "spec": dict(spec.__dict__)}


def _pm(stats, scale=100.0):
    return f"{scale * stats['mean']:.2f} ± {scale * stats['std']:.2f}"


def _dpm(stats):
    return f"{stats['mean']:+.2f} ± {stats['std']:.2f}"


def confirm_table(out, cfg):
    n = len(cfg["seeds"])
    lines = [
        f"## SWA vs SGD on the test split: {cfg['dataset']}, {cfg['model']} width {cfg['width']}",
        "",
        f"The screen's choice ({out['chosen']['name']}, lr_init {out['chosen']['lr_init']:g}, "
        f"weight decay {out['chosen']['weight_decay']:g} on every parameter), trained on "
        f"{cfg['train_size']} training images, evaluated once on {cfg['test_size']} test images; "
        f"budget B = {cfg['budget']} epochs; seeds {cfg['seeds']} (mean ± std).",
        "",
        "| budget | epochs | SGD, own schedule (%) | SWA (%) | captures | SWA − SGD at B "
        "(points) | seeds | SWA − SGD at the same epochs (points) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['budget']} B | {r['epochs']} | {_pm(r['sgd'])} | {_pm(r['swa'])} | "
            f"{r['captures']} | {_dpm(r['swa_minus_sgd_B_points'])} | "
            f"{r['seeds_better_than_sgd_B']}/{n} | {_dpm(r['swa_minus_sgd_same_epochs_points'])}"
            f" | {r['seeds_better_than_sgd_same_epochs']}/{n} |"
        )
    ab = out["ablation_at_B"]
    lines += [
        "",
        f"At budget 1: SWA without the BN recompute {_pm(ab['swa_no_bn_recompute'])}%, the SWA "
        f"run's own iterate {_pm(ab['swa_run_iterate'])}%.",
        "",
    ]
    for r in out["rows"]:
        d = r["swa_minus_sgd_B_points"]
        lines.append(
            f"- Budget {r['budget']}: SWA {'beat' if d['mean'] > 0 else 'did NOT beat'} SGD "
            f"({d['mean']:+.2f} points, better in {r['seeds_better_than_sgd_B']} of {n} seeds; "
            f"against SGD trained for the same {r['epochs']} epochs "
            f"{r['swa_minus_sgd_same_epochs_points']['mean']:+.2f})."
        )
    lines.append(
        f"- Target (ahead at every budget, at least +{TARGET_POINTS} points at 1.5 B in every "
        f"seed), against SGD at B: {'met' if out['target_met'] else 'NOT met'}; against SGD "
        f"trained for the same epochs: "
        f"{'met' if out['target_met_against_sgd_same_epochs'] else 'NOT met'}."
    )
    return "\n".join(lines) + "\n"

