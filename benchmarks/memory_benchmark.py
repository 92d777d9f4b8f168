"""Peak memory of SWA's averaging state vs one fp32 copy of the parameters.

    python -m benchmarks.memory_benchmark                 # 100M parameters (400 MB fp32)
    python -m benchmarks.memory_benchmark --quick         # 4M parameters, for CI

Each measurement runs in a fresh Python process: it creates `--num_params` fp32 weights in tensors
of `--tensor_size` floats, then creates `AveragedWeights` (one fp32 average per weight), runs
`update()` `--updates` times and `swap()` once. Memory is read from Linux's `/proc/self/status`
(`VmRSS` now, `VmHWM` the peak); before the later updates and before the swap the peak is reset
(`/proc/self/clear_refs`), so each stage's peak is the peak within that stage. For every stage
the table gives, in copies of the fp32 parameter bytes:

- `extra over weights`: the stage's peak resident memory minus the resident memory with the
  weights alone (target: <= 1.05, i.e. the averages and nothing more);
- `growth in stage`: the stage's peak minus the resident memory when the stage began (what
  the step itself allocates: an update in place should add ~0).

XLA's one-time start-up in the process (~55 MiB here, paid by any jit-compiled training step as
well) is measured first, on its own, and is not charged to the averages. The first `update()`
compiles the update's XLA program; the memory that compilation keeps (tens of MiB, set by the
number of tensors, not by their size) is in that stage and in the later ones. Before the later
updates the C allocator's free memory is returned to the system (`malloc_trim`), so those
stages show what the update holds, not what the compiler left free. The memory a whole `fit`
uses is not measured here.
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
flags.DEFINE_integer("updates", 3, "How many update() calls to run (the first one compiles).")

TARGET = 1.05

_CHILD = r"""
import ctypes, json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
from keras_swa.averaged_weights import AveragedWeights

num_params, tensor_size, updates, nonfinite = (
    int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    raise RuntimeError(key + " not in /proc/self/status")

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False

stages = {}
def stage(name, begin):
    stages[name] = {"begin": begin, "peak": status("VmHWM"), "end": status("VmRSS")}

begin = status("VmRSS")
# XLA's one-time start-up in this process (compiler, thread pools), which any jit-compiled
# training step pays as well: measured on its own, before the weights.
tf.function(lambda x: tf.reduce_sum(x * 2.0) + 1.0, jit_compile=True)(tf.ones([1000]))
stage("xla_start_up", begin)
begin = status("VmRSS")
sizes = [tensor_size] * (num_params // tensor_size)
if num_params % tensor_size:
    sizes.append(num_params % tensor_size)
weights = []
for i, size in enumerate(sizes):
    weights.append(tf.Variable(tf.fill([size], 0.5 + i), trainable=True))
stage("weights", begin)
begin = status("VmRSS")
averaged = AveragedWeights(weights, nonfinite=nonfinite)
stage("averages_created", begin)
begin = status("VmRSS")
averaged.update()
stage("first_update", begin)
trimmed = trim()
resets = reset_peak()
begin = status("VmRSS")
for _ in range(updates - 1):
    averaged.update()
stage("later_updates", begin)
resets = reset_peak() and resets
begin = status("VmRSS")
with averaged.swap():
    pass
stage("swap", begin)
print(json.dumps({"stages": stages, "peak_reset": resets, "malloc_trim": trimmed}))
"""

STAGES = ("averages_created", "first_update", "later_updates", "swap")


def _measure(nonfinite):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), root] if p)
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
    if FLAGS.num_params < 1 or FLAGS.tensor_size < 1 or FLAGS.updates < 2:
        raise app.UsageError(
            "--num_params and --tensor_size must be positive and --updates at least 2. "
            f"Received: num_params={FLAGS.num_params}, tensor_size={FLAGS.tensor_size}, "
            f"updates={FLAGS.updates}"
        )
    param_bytes = 4 * FLAGS.num_params
    rows, results, notes = [], {}, []
    for nonfinite in ("raise", "ignore"):
        measured = _measure(nonfinite)
        stages = measured["stages"]
        weights_rss = stages["weights"]["end"]
        summary = {}
        for name in STAGES:
            s = stages[name]
            extra = (s["peak"] - weights_rss) / param_bytes
            growth = (s["peak"] - s["begin"]) / param_bytes
            summary[name] = {"extra_over_weights": extra, "growth_in_stage": growth}
            rows.append([
                f"nonfinite={nonfinite!r}", name, f"{extra:.3f}", f"{growth:.3f}",
                "met" if extra <= TARGET else "NOT met",
            ])
        kept = (stages["first_update"]["end"] - stages["first_update"]["begin"]) / 2**20
        summary["first_update_resident_growth_mib"] = kept
        start_up = stages["xla_start_up"]
        summary["xla_start_up_mib"] = (start_up["peak"] - start_up["begin"]) / 2**20
        results[nonfinite] = {"bytes": measured, "in_param_copies": summary}
        if not (measured["peak_reset"] and measured["malloc_trim"]):
            notes.append(
                f"nonfinite={nonfinite!r}: peak reset {measured['peak_reset']}, malloc_trim "
                f"{measured['malloc_trim']}: later stages include the earlier peaks."
            )
        print(f"nonfinite={nonfinite}: " + ", ".join(
            f"{k}={v['extra_over_weights']:.3f}x/{v['growth_in_stage']:+.3f}x"
            for k, v in summary.items() if isinstance(v, dict)), flush=True)
    notes.append(
        "XLA's one-time start-up, measured before the weights and not charged above: "
        + ", ".join(f"{k} {v['in_param_copies']['xla_start_up_mib']:.0f} MiB"
                    for k, v in results.items()) + "."
    )
    notes.append(
        "first_update includes XLA's compilation of the update (memory set by the number of "
        "tensors and the program, not by the parameter count); resident growth in that stage: "
        + ", ".join(f"{k} {v['in_param_copies']['first_update_resident_growth_mib']:.0f} MiB"
                    for k, v in results.items())
        + ". later_updates are the steady state, after malloc_trim; `growth in stage` ~0 "
        "means the update runs in place."
    )
    table = (
        f"# Peak memory of the SWA state: {FLAGS.num_params:,} fp32 parameters "
        f"({param_bytes / 2**20:.0f} MiB) in tensors of {FLAGS.tensor_size:,}\n\n"
        f"`{bench_flags.command_line('benchmarks.memory_benchmark')}`\n\n"
        "Peak resident memory in copies of the fp32 parameter bytes: `extra over weights` is "
        f"the stage's peak minus the weights alone (target <= {TARGET}), `growth in stage` the "
        "stage's peak minus the memory when it began.\n\n"
        + bench_flags.markdown_table(
            ["variant", "stage", "extra over weights", "growth in stage", "target"], rows)
        + "\n\n" + "\n".join(f"- note: {n}" for n in notes) + "\n"
    )
    print(table)
    # The target, per variant: the state's extra peak memory when created and during
    # updates (steady state; the first update also holds XLA's compilation, noted above).
    targets = [
        {
            "name": f"peak over weights, {stage.replace('_', ' ')}, nonfinite={nonfinite!r}",
            "value": result["in_param_copies"][stage]["extra_over_weights"],
            "target": TARGET,
            "met": result["in_param_copies"][stage]["extra_over_weights"] <= TARGET,
        }
        for nonfinite, result in results.items()
        for stage in ("averages_created", "later_updates")
    ]
    labels = [f"{r[0]} {r[1]}" for r in rows]
    values = [float(r[2]) for r in rows]
    bench_flags.write_results(
        "memory_benchmark",
        {"benchmark": "memory_benchmark",
         "command": bench_flags.command_line("benchmarks.memory_benchmark"),
         "machine": bench_flags.machine_info(),
         "config": {"quick": FLAGS.quick, "num_params": FLAGS.num_params,
                    "tensor_size": FLAGS.tensor_size, "updates": FLAGS.updates},
         "param_bytes": param_bytes, "target": TARGET, "targets": targets,
         "results": results, "notes": notes,
         "versions": bench_flags.versions()},
        table,
        lambda path: bench_flags.save_bar_plot(
            path, labels, values, values, values, "extra peak memory / fp32 parameter bytes",
            "SWA state memory", reference=(TARGET, f"target {TARGET}x")),
    )


if __name__ == "__main__":
    app.run(main)
