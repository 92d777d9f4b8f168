"""Peak memory of SWA's averaging state vs one fp32 copy of the parameters.

    python -m benchmarks.memory_benchmark                 # 100M parameters (400 MB fp32)
    python -m benchmarks.memory_benchmark --quick         # 4M parameters, for CI

Each measurement runs in a fresh Python process (peak RSS only grows within a process): it creates
`--num_params` fp32 weights in tensors of `--tensor_size` floats, records the peak resident set
size, then creates `AveragedWeights` (one fp32 average per weight), runs `update()` several times
and `swap()` once, recording the peak after each stage. The target: every stage adds at most
1.05x the bytes of one fp32 copy of the parameters over the weights alone (no hidden extra
copies). The memory a whole `fit` uses is not measured here.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

from benchmarks import flags as bench_flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_params", 100_000_000, "Number of fp32 parameters.")
flags.DEFINE_integer("tensor_size", 4_000_000, "Floats per weight tensor.")
flags.DEFINE_integer("updates", 3, "How many update() calls to run.")

_CHILD = r"""
import json, os, resource, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
from keras_swa.averaged_weights import AveragedWeights

num_params, tensor_size, updates, nonfinite = (
    int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB -> bytes on Linux

stages = {"start": peak()}
sizes = [tensor_size] * (num_params // tensor_size)
if num_params % tensor_size:
    sizes.append(num_params % tensor_size)
weights = []
for i, size in enumerate(sizes):
    weights.append(tf.Variable(tf.fill([size], 0.5 + i), trainable=True))
stages["weights"] = peak()
averaged = AveragedWeights(weights, nonfinite=nonfinite)
stages["averages_created"] = peak()
for _ in range(updates):
    averaged.update()
stages["after_updates"] = peak()
with averaged.swap():
    pass
stages["after_swap"] = peak()
print(json.dumps(stages))
"""


def _measure(nonfinite):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [env.get("PYTHONPATH", ""), root] if p
    )
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(FLAGS.num_params), str(FLAGS.tensor_size),
         str(FLAGS.updates), nonfinite],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(_):
    bench_flags.validate_common_flags()
    if FLAGS.quick:
        FLAGS.num_params = 4_000_000
        FLAGS.tensor_size = 500_000
    if FLAGS.num_params < 1 or FLAGS.tensor_size < 1 or FLAGS.updates < 1:
        raise app.UsageError(
            "--num_params, --tensor_size and --updates must be positive. Received: "
            f"num_params={FLAGS.num_params}, tensor_size={FLAGS.tensor_size}, "
            f"updates={FLAGS.updates}"
        )
    param_bytes = 4 * FLAGS.num_params
    rows, results = [], {}
    for nonfinite in ("raise", "ignore"):
        stages = _measure(nonfinite)
        base = stages["weights"]
        ratios = {k: (v - base) / param_bytes for k, v in stages.items() if k not in ("start", "weights")}
        results[nonfinite] = {"peak_bytes": stages, "extra_over_weights_in_param_copies": ratios}
        for stage, ratio in ratios.items():
            rows.append([f"nonfinite={nonfinite!r}", stage, f"{ratio:.3f}",
                         "met" if ratio <= 1.05 else "NOT met"])
        print(f"nonfinite={nonfinite}: " + ", ".join(f"{k}={v:.3f}x" for k, v in ratios.items()),
              flush=True)
    table = (
        f"# Peak memory of the SWA state: {FLAGS.num_params:,} fp32 parameters "
        f"({param_bytes / 2**20:.0f} MiB)\n\n`{bench_flags.command_line('memory_benchmark')}`\n\n"
        "Extra peak RSS over the weights alone, in copies of the fp32 parameters "
        "(target <= 1.05):\n\n"
        + bench_flags.markdown_table(["variant", "stage", "extra / param bytes", "target"], rows)
        + "\n"
    )
    print(table)
    labels = [f"{r[0]} {r[1]}" for r in rows]
    values = [float(r[2]) for r in rows]
    bench_flags.write_results(
        "memory_benchmark",
        {"config": {"num_params": FLAGS.num_params, "tensor_size": FLAGS.tensor_size,
                    "updates": FLAGS.updates},
         "param_bytes": param_bytes, "results": results, "versions": bench_flags.versions()},
        table,
        lambda path: bench_flags.save_bar_plot(
            path, labels, values, values, values, "extra peak memory / fp32 parameter bytes",
            "SWA state memory", reference=(1.05, "target 1.05x")),
    )


if __name__ == "__main__":
    app.run(main)
