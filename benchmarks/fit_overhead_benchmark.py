"""What the `keras_swa.SWA` callback adds to `model.fit`, and what the final BatchNorm pass costs.

A small BatchNorm convnet (Conv-BN-ReLU x2, max-pool, dense) trains on synthetic 28x28x1 images.
One model is fit repeatedly, round-robin, with three callback sets (a fresh `SWA` per fit, as a
user would create it):

- `plain fit`: only the timing callback;
- `SWA, capture every epoch`: `SWA(bn_data=x)`, one capture per epoch;
- `SWA, capture every step`: `SWA(cycle_unit="step", cycle_length=1, bn_data=x)`, one capture
  per optimizer step (a per-batch hook: Keras runs such a fit without async dispatch).

The timing callback is itself epoch-level only (it overrides no batch hook, so it changes nothing
about how `fit` runs) and is listed last: an epoch's time is the time between two consecutive
`on_epoch_end` calls, which includes every callback's epoch and batch hooks. The first epoch of
every fit has no such start and is dropped (it holds tracing and XLA compilation in the warm-up
round). The work SWA does in `on_train_end` (writing the averages into the model and the final
`update_bn` pass) is timed separately, from the last `on_epoch_end` to the end of `fit`. The
time spent inside the SWA callback's own hooks is recorded per epoch too (a lower bound on its
cost that noise does not blur). `keras_swa.update_bn(model, x)` is timed on its own over the
same data and batch size and compared with one training epoch. Targets, stated in the output:
per-epoch captures <= 1.01x plain fit, per-step captures <= 1.05x, one `update_bn` pass <= 0.5x
one training epoch.

Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018, arXiv 1803.05407.

Run (from the repository root):

    python -m benchmarks.fit_overhead_benchmark
    python -m benchmarks.fit_overhead_benchmark --backend=jax

With `--backend=jax` the same fits run on Keras 3's JAX backend (`fit`'s jitted, stateless
train step; the SWA callback's JAX path, `keras_swa/backends/jax.py`), written to
`fit_overhead_benchmark_jax.{json,md,png}`. On either backend the targets are judged twice: by
wall time (the ratios of epoch times above) and by hook time, `1 + (time inside SWA's hooks per
epoch) / (plain epoch)`, per round; the hook time is the callback's own cost, which the noise
of a shared machine does not blur, but it misses the indirect cost of per-step hooks (Keras
runs such a fit without asynchronous dispatch).

Smoke test (a few hundred images, seconds):

    python -m benchmarks.fit_overhead_benchmark --quick --output_dir /tmp/bench
    python -m benchmarks.fit_overhead_benchmark --quick --backend=jax --output_dir /tmp/bench
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import backend_flag  # noqa: E402

# Before any import of Keras (see `benchmarks/backend_flag.py`).
if __name__ == "__main__":
    backend_flag.select_from_argv()

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import flags as bench  # noqa: E402
from keras_swa.backend import keras  # noqa: E402
from keras_swa.batch_norm import update_bn  # noqa: E402
from keras_swa.callback import SWA  # noqa: E402
from keras_swa.lazy_tensorflow import tf  # noqa: E402  (imported on TensorFlow only)

FLAGS = flags.FLAGS

flags.DEFINE_integer(
    "num_images", None, "Number of synthetic training images. Defaults to 6000 (256 with --quick)."
)
flags.DEFINE_integer("batch_size", 64, "Batch size of `fit` and of `update_bn`.")
flags.DEFINE_integer(
    "epochs_per_fit",
    None,
    "Epochs of each `fit` call; the first one of each is not timed. Defaults to 3 (2 with "
    "--quick).",
)
backend_flag.define_flag("fit_overhead_benchmark")

NAME = "fit_overhead_benchmark"
PLAIN = "plain fit"
PER_EPOCH = "SWA, capture every epoch"
PER_STEP = "SWA, capture every step"
BN_PASS = "update_bn(model, x), one pass"

TARGETS = {PER_EPOCH: 1.01, PER_STEP: 1.05, BN_PASS: 0.5}
BY_HOOK_TIME = " by hook time"


class EpochTimer(keras.callbacks.Callback):
    """Records the time of every `on_epoch_end` and of `on_train_end`; no batch hooks."""

    def __init__(self):
        super().__init__()
        self.epoch_ends = []
        self.train_end = None

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ends.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.train_end = time.perf_counter()


def build_model(seed=0):
    """Conv-BN-ReLU x2, max-pool, dense: a small BatchNorm convnet for 28x28x1 inputs."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10)(x)
    model = keras.Model(inputs, outputs, name="bn_convnet")
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def synthetic_data(num_images, seed=0):
    """Images with a learnable class signal (a class-dependent brightness), float32."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=num_images).astype("int32")
    x = rng.normal(size=(num_images, 28, 28, 1)).astype("float32")
    x += (y.astype("float32") / 10.0)[:, None, None, None]
    return x, y


def time_own_hooks(callback):
    """Wraps the epoch hooks and the batch hooks `callback` already overrides with timers.

    Returns a list that receives, at each `on_epoch_end`, the seconds spent inside the
    callback's own hooks during that epoch. Batch hooks the callback does not override stay
    untouched, so Keras dispatches the fit exactly as it would without the timers.
    """
    per_epoch = []
    spent = [0.0]

    def wrap(hook, closes_epoch=False):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
                if closes_epoch:
                    per_epoch.append(spent[0])
                    spent[0] = 0.0

        return timed

    callback.on_epoch_begin = wrap(callback.on_epoch_begin)
    callback.on_epoch_end = wrap(callback.on_epoch_end, closes_epoch=True)
    for name in ("on_train_batch_begin", "on_train_batch_end"):
        if name in vars(callback):  # bound per instance: an overriding hook
            setattr(callback, name, wrap(getattr(callback, name)))
    return per_epoch


def _fit_variant(model, x, y, epochs, batch_size, make_swa):
    def run():
        timer = EpochTimer()
        callbacks = [timer]
        hook_s = None
        if make_swa is not None:
            swa = make_swa()
            hook_s = time_own_hooks(swa)
            callbacks.insert(0, swa)
        model.fit(x, y, batch_size=batch_size, epochs=epochs, callbacks=callbacks, verbose=0)
        ends = timer.epoch_ends
        out = {
            "epoch_s": [b - a for a, b in zip(ends, ends[1:])],
            "train_end_s": timer.train_end - ends[-1],
        }
        if hook_s is not None:
            out["swa_hooks_s"] = hook_s[1:]  # the first epoch holds the XLA compilation
        return out

    return run


def _bn_variant(model, x, batch_size):
    def run():
        start = time.perf_counter()
        update_bn(model, x, batch_size=batch_size, verbose=0)
        return {"pass_s": time.perf_counter() - start}

    return run


def _verdict(value, target):
    return "met" if value <= target else "NOT met"


def main(_):
    bench.validate_common_flags()
    backend_flag.check_loaded(keras, NAME)
    on_jax = FLAGS.backend == "jax"
    num_images = FLAGS.num_images
    if num_images is None:
        num_images = 256 if FLAGS.quick else 6000
    epochs = FLAGS.epochs_per_fit
    if epochs is None:
        epochs = 2 if FLAGS.quick else 3
    if num_images < 1:
        raise app.UsageError(
            f"`--num_images` must be a positive integer. Received: num_images={num_images}"
        )
    if FLAGS.batch_size < 1:
        raise app.UsageError(
            f"`--batch_size` must be a positive integer. Received: batch_size={FLAGS.batch_size}"
        )
    if epochs < 2:
        raise app.UsageError(
            "`--epochs_per_fit` must be at least 2 (the first epoch of each fit is not timed). "
            f"Received: epochs_per_fit={epochs}"
        )
    repeats, warmup = bench.rounds(
        default_repeats=8, default_warmup=1, quick_repeats=1, quick_warmup=0
    )
    if on_jax:
        import jax

        name_written = f"{NAME}_jax"
        device = jax.devices()[0]
        platform = f"JAX {jax.__version__} on {device.platform} ({device.device_kind})"
        backend_config = {"backend": "jax", "device": str(device)}
        extra_versions = {"jax": jax.__version__}
    else:
        tf.get_logger().setLevel("ERROR")
        name_written = NAME
        platform = f"TF {tf.__version__}"
        backend_config = {
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()
        }
        extra_versions = {}
    machine = bench.machine_info()
    command = bench.command_line("benchmarks.fit_overhead_benchmark")
    batch_size = FLAGS.batch_size

    x, y = synthetic_data(num_images)
    model = build_model()
    steps_per_epoch = -(-num_images // batch_size)

    variants = {
        PLAIN: _fit_variant(model, x, y, epochs, batch_size, None),
        PER_EPOCH: _fit_variant(
            model, x, y, epochs, batch_size, lambda: SWA(bn_data=x, verbose=0)
        ),
        PER_STEP: _fit_variant(
            model,
            x,
            y,
            epochs,
            batch_size,
            lambda: SWA(cycle_unit="step", cycle_length=1, bn_data=x, verbose=0),
        ),
        BN_PASS: _bn_variant(model, x, batch_size),
    }
    measured = bench.interleave(variants, repeats, warmup, log=print)

    # Per round: the median epoch of each fit (the BN pass: its one time).
    per_round = {
        name: [
            statistics.median(m["epoch_s"]) if "epoch_s" in m else m["pass_s"] for m in values
        ]
        for name, values in measured.items()
    }
    plain = per_round[PLAIN]
    plain_train_end = [m["train_end_s"] for m in measured[PLAIN]]
    results = []
    for name, values in measured.items():
        samples = (
            [s for m in values for s in m["epoch_s"]]
            if "epoch_s" in values[0]
            else [m["pass_s"] for m in values]
        )
        stats = bench.summarize(samples)
        row = {
            "name": name,
            "unit": "seconds per epoch" if "epoch_s" in values[0] else "seconds per pass",
            "timings_s": samples,
            "per_round_s": per_round[name],
            "median_s": stats["median"],
            "p25_s": stats["p25"],
            "p75_s": stats["p75"],
            "min_s": stats["min"],
            "ratio_to_plain_epoch": bench.paired_ratio(per_round[name], plain),
            "target": TARGETS.get(name),
        }
        if "epoch_s" in values[0]:
            train_end = [m["train_end_s"] for m in values]
            row["train_end_s"] = train_end
            row["train_end_median_s"] = statistics.median(train_end)
            row["train_end_extra_s"] = statistics.median(
                a - b for a, b in zip(train_end, plain_train_end)
            )
        if "swa_hooks_s" in values[0]:
            hooks = [s for m in values for s in m["swa_hooks_s"]]
            row["swa_hooks_s"] = hooks
            row["swa_hooks_median_s"] = statistics.median(hooks)
            # Per round: a plain epoch plus this fit's median time inside SWA's hooks, over the
            # plain epoch of the same round.
            hooks_per_round = [statistics.median(m["swa_hooks_s"]) for m in values]
            row["ratio_to_plain_epoch_by_hook_time"] = bench.paired_ratio(
                [p + h for p, h in zip(plain, hooks_per_round)], plain
            )
        if row["target"] is not None:
            row["target_met"] = row["ratio_to_plain_epoch"] <= row["target"]
        results.append(row)
    by_name = {r["name"]: r for r in results}
    for r in results:
        r["ratio_of_minimums_to_plain_epoch"] = r["min_s"] / by_name[PLAIN]["min_s"]
    plain_epoch = by_name[PLAIN]["median_s"]
    spread = (by_name[PLAIN]["p75_s"] - by_name[PLAIN]["p25_s"]) / plain_epoch
    for r in results:
        if "swa_hooks_median_s" in r:
            r["swa_hooks_share_of_plain_epoch"] = r["swa_hooks_median_s"] / plain_epoch

    headers = [
        "variant",
        "median s",
        "p25-p75 s",
        "min s",
        "x plain epoch",
        "x plain (minimums)",
        "target",
        "verdict",
    ]
    rows = []
    for r in results:
        target = r["target"]
        rows.append(
            [
                f"{r['name']} ({'per epoch' if 'train_end_s' in r else 'per pass'})",
                f"{r['median_s']:.3f}",
                f"{r['p25_s']:.3f}-{r['p75_s']:.3f}",
                f"{r['min_s']:.3f}",
                f"{r['ratio_to_plain_epoch']:.3f}",
                f"{r['ratio_of_minimums_to_plain_epoch']:.3f}",
                f"<= {target}" if target is not None else "",
                _verdict(r["ratio_to_plain_epoch"], target) if target is not None else "",
            ]
        )
    hook_headers = [
        "variant",
        "time inside SWA's hooks, ms/epoch (median)",
        "share of a plain epoch",
        "x plain epoch by hook time",
        "target",
        "verdict",
    ]
    hook_rows = [
        [
            name,
            f"{by_name[name]['swa_hooks_median_s'] * 1e3:.2f}",
            f"{100 * by_name[name]['swa_hooks_share_of_plain_epoch']:.2f}%",
            f"{by_name[name]['ratio_to_plain_epoch_by_hook_time']:.4f}",
            f"<= {TARGETS[name]}",
            _verdict(by_name[name]["ratio_to_plain_epoch_by_hook_time"], TARGETS[name]),
        ]
        for name in (PER_EPOCH, PER_STEP)
    ]
    end_headers = ["variant", "on_train_end s (median)", "extra vs plain fit s", "x plain epoch"]
    end_rows = []
    for name in (PLAIN, PER_EPOCH, PER_STEP):
        r = by_name[name]
        end_rows.append(
            [
                name,
                f"{r['train_end_median_s']:.3f}",
                f"{r['train_end_extra_s']:.3f}",
                f"{r['train_end_median_s'] / plain_epoch:.3f}",
            ]
        )
    lines = [
        f"# SWA overhead in model.fit: {num_images} images 28x28x1, batch {batch_size}, "
        f"{steps_per_epoch} steps/epoch" + (" (--quick)" if FLAGS.quick else ""),
        "",
        f"`{command}`",
        "",
        f"{repeats} interleaved rounds after {warmup} warm-up round(s); each fit runs {epochs} "
        f"epochs, the first not timed; ratios are medians of per-round ratios. "
        f"{machine['cpu_model']}, {machine['cpu_count']} CPUs; "
        f"{bench.versions()['keras_flavour']}, {platform}.",
        "",
        bench.markdown_table(headers, rows),
        "",
        "Time spent inside the SWA callback's own hooks (a lower bound on its cost that noise "
        "does not blur; it misses what the per-step hooks cost `fit` indirectly, such as the "
        "loss of asynchronous dispatch), and the targets judged by it, `1 + hooks / plain "
        "epoch` per round:",
        "",
        bench.markdown_table(hook_headers, hook_rows),
        "",
        "End of training (SWA's `on_train_end`: averages into the model + `update_bn`; not "
        "in the epoch times above):",
        "",
        bench.markdown_table(end_headers, end_rows),
        "",
        f"Noise: the plain fit's own epochs spread p25-p75 over {100 * spread:.0f}% of their "
        f"median (load average {machine.get('load_average_at_start')} at the start); verdicts "
        "use medians of per-round ratios, the minimums approximate the uncontended cost.",
    ]
    busiest = bench.busiest_load(machine)
    if busiest > machine["cpu_count"]:
        lines.append(
            f"The machine was busy during this run (load average up to {busiest} on "
            f"{machine['cpu_count']} CPUs, from other processes): absolute times are noisy; the "
            "ratios, measured side by side in the same rounds, and the hook times stay "
            "meaningful."
        )
    table = "\n".join(lines)
    print(table)

    targets = [
        {
            "name": name,
            "value": by_name[name]["ratio_to_plain_epoch"],
            "target": target,
            "met": by_name[name]["ratio_to_plain_epoch"] <= target,
            "value_from_minimums": by_name[name]["ratio_of_minimums_to_plain_epoch"],
        }
        for name, target in TARGETS.items()
    ]
    targets += [
        {
            "name": name + BY_HOOK_TIME,
            "value": by_name[name]["ratio_to_plain_epoch_by_hook_time"],
            "target": TARGETS[name],
            "met": by_name[name]["ratio_to_plain_epoch_by_hook_time"] <= TARGETS[name],
        }
        for name in (PER_EPOCH, PER_STEP)
    ]
    payload = {
        "benchmark": name_written,
        "command": command,
        "machine": machine,
        "versions": bench.versions(**extra_versions),
        "config": {
            "quick": FLAGS.quick,
            "repeats": repeats,
            "warmup": warmup,
            "num_images": num_images,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "epochs_per_fit": epochs,
            "model": "Conv2D(16)-BN-ReLU, Conv2D(32)-BN-ReLU, MaxPool(2), Flatten, Dense(10)",
            "model_params": int(model.count_params()),
            "optimizer": "SGD(learning_rate=0.01, momentum=0.9)",
            "jit_compile": str(getattr(model, "jit_compile", None)),
            "swa_per_epoch": "SWA(bn_data=x, verbose=0)",
            "swa_per_step": "SWA(cycle_unit='step', cycle_length=1, bn_data=x, verbose=0)",
            "update_bn": f"update_bn(model, x, batch_size={batch_size}, verbose=0)",
            **backend_config,
        },
        "results": results,
        "plain_epoch_relative_spread": spread,
        "targets": targets,
    }

    def plot(path):
        bench.save_bar_plot(
            path,
            labels=[r["name"] for r in results],
            values=[r["median_s"] for r in results],
            lows=[r["p25_s"] for r in results],
            highs=[r["p75_s"] for r in results],
            ylabel="seconds per epoch (update_bn: per pass); median, whiskers p25-p75",
            title=f"SWA in fit ({FLAGS.backend}): {num_images} images, batch {batch_size}",
            reference=(by_name[PLAIN]["median_s"], "plain fit epoch"),
        )

    paths = bench.write_results(name_written, payload, table, plot)
    print("Wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
