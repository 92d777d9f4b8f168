"""What the `keras_swa.SWA` callback adds to `model.fit` under MultiWorkerMirroredStrategy.

Two worker processes on this machine (localhost ports, one `TF_CONFIG` each) form a
`tf.distribute.MultiWorkerMirroredStrategy` cluster. Each builds the same small BatchNorm convnet
(Conv-BN-ReLU x2, max-pool, dense) on synthetic 16x16x1 images and trains it with tf_keras
`model.fit` (the workers always run with `TF_USE_LEGACY_KERAS=1`: Keras 3 `fit` fails under
MultiWorkerMirroredStrategy upstream, keras-team/keras#20585), round-robin over two variants:

- `plain fit (2 workers)`: only the timing callback;
- `SWA, capture every epoch, bn_data (2 workers)`: a fresh `SWA(bn_data=x)` per fit, one
  capture per epoch and the final BatchNorm pass.

The variants alternate (the first one rotates each round), the first `--warmup` rounds are
discarded, and each round contributes one ratio: the median epoch time of the SWA fit over the
median epoch time of the plain fit. An epoch's time is the time between two consecutive
`on_epoch_end` calls of an epoch-level timing callback listed last, so the first epoch of every
fit (tracing, collective setup) is excluded. The end of training (SWA's `on_train_end`: the
averages into the model and `update_bn` over `bn_data`, collectives included) is timed from the
last `on_epoch_end` to the end of `fit`. The figures reported are the chief's (worker 0); both
workers' timings are in the JSON. The workers run in lockstep (every step is an all-reduce), so
their epoch times agree. The coordinator waits at most `--timeout_s` and kills both workers in
any case.

Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018, arXiv 1803.05407.

Run (from the repository root):

    python -m benchmarks.multi_worker_benchmark

Smoke test (tiny sizes, one round, well under a minute):

    python -m benchmarks.multi_worker_benchmark --quick --output_dir /tmp/bench
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import flags as bench

FLAGS = flags.FLAGS

flags.DEFINE_integer(
    "num_images",
    None,
    "Number of synthetic training images (global). Defaults to 2048 (128 with --quick).",
)
flags.DEFINE_integer("batch_size", 64, "Global batch size of `fit` (split over the 2 workers).")
flags.DEFINE_integer(
    "epochs_per_fit",
    None,
    "Epochs of each `fit` call; the first one of each is not timed. Defaults to 4 (3 with "
    "--quick).",
)
flags.DEFINE_integer(
    "timeout_s",
    None,
    "Seconds the coordinator waits for the workers before killing them. Defaults to 600 "
    "(120 with --quick).",
)
flags.DEFINE_integer(
    "worker_index",
    None,
    "Internal: run as worker INDEX of the cluster in TF_CONFIG (set by the coordinator).",
)
flags.DEFINE_string(
    "worker_config",
    None,
    "Internal: the worker's configuration and result file, as JSON (set by the coordinator).",
)

NAME = "multi_worker_benchmark"
NUM_WORKERS = 2
PLAIN = f"plain fit ({NUM_WORKERS} workers)"
SWA_ROW = f"SWA, capture every epoch, bn_data ({NUM_WORKERS} workers)"


# --------------------------------------------------------------------------------------------
# Worker side (runs with TF_USE_LEGACY_KERAS=1 and TF_CONFIG set by the coordinator).
# --------------------------------------------------------------------------------------------


def _worker(config):
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # first: before any other TF op

    from keras_swa.backend import IS_KERAS_3, keras
    from keras_swa.callback import SWA

    if IS_KERAS_3:
        raise RuntimeError("The multi-worker benchmark's workers need TF_USE_LEGACY_KERAS=1.")

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

    rng = np.random.default_rng(0)
    num_images = config["num_images"]
    y = rng.integers(0, 10, size=num_images).astype("int32")
    x = rng.normal(size=(num_images, 16, 16, 1)).astype("float32")
    x += (y.astype("float32") / 10.0)[:, None, None, None]

    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16, 16, 1))
        h = inputs
        for filters in (16, 32):
            h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
            h = keras.layers.BatchNormalization()(h)
            h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D(2)(h)
        h = keras.layers.Flatten()(h)
        outputs = keras.layers.Dense(10)(h)
        model = keras.Model(inputs, outputs, name="bn_convnet")
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

    def fit(make_swa):
        timer = EpochTimer()
        callbacks = [timer] if make_swa is None else [make_swa(), timer]
        model.fit(
            x,
            y,
            batch_size=config["batch_size"],
            epochs=config["epochs_per_fit"],
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        )
        ends = timer.epoch_ends
        return {
            "epoch_s": [b - a for a, b in zip(ends, ends[1:])],
            "train_end_s": timer.train_end - ends[-1],
        }

    variants = {
        PLAIN: lambda: fit(None),
        SWA_ROW: lambda: fit(lambda: SWA(bn_data=x, bn_batch_size=config["batch_size"], verbose=0)),
    }
    # Both workers run the same sequence: every fit is a collective, lockstep affair.
    timings = bench.interleave(variants, config["repeats"], config["warmup"])
    with open(config["worker_file"], "w", encoding="utf-8") as f:
        json.dump(
            {
                "timings": timings,
                "versions": bench.versions(),
                "num_replicas_in_sync": strategy.num_replicas_in_sync,
            },
            f,
        )


# --------------------------------------------------------------------------------------------
# Coordinator side: starts the workers, waits (bounded), kills them, writes the results.
# --------------------------------------------------------------------------------------------


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path, chars=3000):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run_workers(config, work_dir, timeout_s):
    """Starts the workers, waits at most `timeout_s`, kills them in any case.

    Returns the workers' result dicts, by index, and the wall time of the whole run.
    """
    ports = _free_ports(NUM_WORKERS)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes, log_paths, result_paths = [], [], []
    start = time.perf_counter()
    try:
        for index in range(NUM_WORKERS):
            env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            env["TF_USE_LEGACY_KERAS"] = "1"
            env["TF_CPP_MIN_LOG_LEVEL"] = "2"
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["TMPDIR"] = work_dir
            # Appended: whatever keras_swa the coordinator's environment finds keeps precedence.
            env["PYTHONPATH"] = os.pathsep.join(
                [p for p in [os.environ.get("PYTHONPATH"), package_parent] if p]
            )
            result_paths.append(os.path.join(work_dir, f"worker_{index}.json"))
            log_paths.append(os.path.join(work_dir, f"worker_{index}.log"))
            worker_config = dict(config, worker_file=result_paths[-1])
            with open(log_paths[-1], "w", encoding="utf-8") as log:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.multi_worker_benchmark",
                            f"--worker_index={index}",
                            "--worker_config=" + json.dumps(worker_config),
                        ],
                        env=env,
                        cwd=os.getcwd(),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = start + timeout_s
        for p in processes:
            p.wait(timeout=max(deadline - time.perf_counter(), 0.1))
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"The workers did not finish within timeout_s={timeout_s}:\n"
            + "\n----\n".join(_tail(p) for p in log_paths)
        ) from None
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall_s = time.perf_counter() - start
    failed = [i for i, p in enumerate(processes) if p.returncode]
    if failed:
        raise RuntimeError(
            f"Worker(s) {failed} failed:\n" + "\n----\n".join(_tail(p) for p in log_paths)
        )
    results = []
    for path in result_paths:
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    return results, wall_s


def _median(values):
    return statistics.median(values)


def main(_):
    if FLAGS.worker_index is not None:
        _worker(json.loads(FLAGS.worker_config))
        return
    bench.validate_common_flags()
    num_images = FLAGS.num_images
    if num_images is None:
        num_images = 128 if FLAGS.quick else 2048
    epochs = FLAGS.epochs_per_fit
    if epochs is None:
        epochs = 3 if FLAGS.quick else 4
    timeout_s = FLAGS.timeout_s
    if timeout_s is None:
        timeout_s = 120 if FLAGS.quick else 600
    for name, value, low in (
        ("num_images", num_images, 1),
        ("batch_size", FLAGS.batch_size, 1),
        ("epochs_per_fit", epochs, 2),
        ("timeout_s", timeout_s, 1),
    ):
        if value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise app.UsageError(f"`--{name}` must be {what}. Received: {name}={value}")
    if FLAGS.batch_size % NUM_WORKERS:
        raise app.UsageError(
            f"`--batch_size` must be divisible by the {NUM_WORKERS} workers. "
            f"Received: batch_size={FLAGS.batch_size}"
        )
    repeats, warmup = bench.rounds(
        default_repeats=5, default_warmup=1, quick_repeats=1, quick_warmup=0
    )
    machine = bench.machine_info()
    command = bench.command_line("benchmarks.multi_worker_benchmark")
    config = {
        "num_images": num_images,
        "batch_size": FLAGS.batch_size,
        "epochs_per_fit": epochs,
        "repeats": repeats,
        "warmup": warmup,
    }
    with tempfile.TemporaryDirectory(prefix="keras_swa_multi_worker_") as work_dir:
        workers, wall_s = run_workers(config, work_dir, timeout_s)
    chief = workers[0]["timings"]

    plain_epoch_medians = [_median(r["epoch_s"]) for r in chief[PLAIN]]
    plain_end = [r["train_end_s"] for r in chief[PLAIN]]
    results = []
    for name in (PLAIN, SWA_ROW):
        rounds_ = chief[name]
        epoch_s = [t for r in rounds_ for t in r["epoch_s"]]
        epoch_medians = [_median(r["epoch_s"]) for r in rounds_]
        end_s = [r["train_end_s"] for r in rounds_]
        stats = bench.summarize(epoch_s)
        end_stats = bench.summarize(end_s)
        results.append(
            {
                "name": name,
                "timings_s": epoch_s,
                "epoch_median_s": stats["median"],
                "epoch_p25_s": stats["p25"],
                "epoch_p75_s": stats["p75"],
                "epoch_min_s": stats["min"],
                "round_epoch_medians_s": epoch_medians,
                "ratio_to_plain_epoch": bench.paired_ratio(epoch_medians, plain_epoch_medians),
                "train_end_s": end_s,
                "train_end_median_s": end_stats["median"],
                "train_end_extra_vs_plain_s": _median(
                    [e - p for e, p in zip(end_s, plain_end)]
                ),
                "train_end_in_plain_epochs": bench.paired_ratio(
                    [e - p for e, p in zip(end_s, plain_end)], plain_epoch_medians
                ),
                "per_worker_epoch_median_s": [
                    _median([t for r in w["timings"][name] for t in r["epoch_s"]])
                    for w in workers
                ],
            }
        )
    by_name = {r["name"]: r for r in results}

    headers = [
        "variant",
        "s/epoch (median)",
        "p25-p75 s",
        "min s",
        "x plain epoch",
        "on_train_end s (median)",
        "extra end vs plain, in plain epochs",
    ]
    rows = [
        [
            r["name"],
            f"{r['epoch_median_s']:.3f}",
            f"{r['epoch_p25_s']:.3f}-{r['epoch_p75_s']:.3f}",
            f"{r['epoch_min_s']:.3f}",
            f"{r['ratio_to_plain_epoch']:.3f}",
            f"{r['train_end_median_s']:.3f}",
            f"{r['train_end_in_plain_epochs']:.2f}",
        ]
        for r in results
    ]
    versions = workers[0]["versions"]
    steps = -(-num_images // FLAGS.batch_size)
    lines = [
        f"# SWA under MultiWorkerMirroredStrategy: {NUM_WORKERS} local workers, tf_keras fit"
        + (" (--quick)" if FLAGS.quick else ""),
        "",
        f"`{command}`",
        "",
        f"BN convnet on {num_images} synthetic 16x16x1 images, global batch {FLAGS.batch_size} "
        f"({steps} steps/epoch), {epochs} epochs per fit (the first not timed); {repeats} "
        f"interleaved rounds after {warmup} warm-up rounds; the chief's timings; `x plain epoch` "
        "is the median of per-round ratios of median epoch times. "
        f"{machine['cpu_model']}, {machine['cpu_count']} CPUs shared by both workers; "
        f"workers on {versions['keras_flavour']} {versions['keras']}, TF {versions['tensorflow']}.",
        "",
        bench.markdown_table(headers, rows),
        "",
        f"- SWA per-epoch overhead: {by_name[SWA_ROW]['ratio_to_plain_epoch']:.3f}x plain fit.",
        f"- End of training (SWA's `on_train_end`: averages into the model + `update_bn` over "
        f"`bn_data`): {by_name[SWA_ROW]['train_end_median_s']:.3f} s (plain fit: "
        f"{by_name[PLAIN]['train_end_median_s']:.3f} s).",
        f"- note: both workers share the machine's {machine['cpu_count']} CPUs with whatever else "
        f"runs (load average {machine.get('load_average_at_start')} at the start); whole run "
        f"{wall_s:.1f} s including the workers' start-up.",
    ]
    table = "\n".join(lines)
    print(table)

    payload = {
        "benchmark": NAME,
        "command": command,
        "machine": machine,
        "versions": versions,
        "config": dict(
            config,
            quick=FLAGS.quick,
            num_workers=NUM_WORKERS,
            num_replicas_in_sync=workers[0]["num_replicas_in_sync"],
            strategy="tf.distribute.MultiWorkerMirroredStrategy",
            keras_in_workers="tf_keras (TF_USE_LEGACY_KERAS=1)",
            swa="SWA(bn_data=x, bn_batch_size=batch_size), a fresh one per fit",
            timeout_s=timeout_s,
        ),
        "results": results,
        "workers": [w["timings"] for w in workers],
        "wall_s": wall_s,
    }

    def plot(path):
        bench.save_bar_plot(
            path,
            labels=[r["name"] for r in results],
            values=[r["epoch_median_s"] for r in results],
            lows=[r["epoch_p25_s"] for r in results],
            highs=[r["epoch_p75_s"] for r in results],
            ylabel="s per epoch (median, whiskers p25-p75), chief worker",
            title=f"fit under MultiWorkerMirroredStrategy, {NUM_WORKERS} local workers",
            reference=(by_name[PLAIN]["epoch_median_s"], "plain fit"),
        )

    paths = bench.write_results(NAME, payload, table, plot)
    print("Wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
