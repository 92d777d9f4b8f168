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

With `--backend=jax` the same stages run on Keras 3's JAX backend (written to
`memory_benchmark_jax.{json,md,png}`), and the report adds, each on its own line:

- the averaging state's bytes: the averages' `nbytes` plus the count's, in copies of the fp32
  parameter bytes (target <= 1.05);
- where the stages' memory is read from: the device's `jax.local_devices()[0].memory_stats()`
  when JAX reports it (GPU/TPU: bytes in use, and the peak since the process started, which
  cannot be reset), else the process RSS as above (on CPU `memory_stats()` is None and the
  arrays live in the process's memory); beside it, the bytes of every live `jax.Array`
  (`jax.live_arrays()`) at each stage's end, over those with the weights alone;
- what XLA's compiled update program needs: `memory_analysis()` of
  `jax.jit(update, donate_argnums=...).lower(...).compile()` for a rebuild of keras_swa's
  update (keras_swa does not expose its compiled program; see `benchmarks/memory_probe.py`):
  arguments, outputs, the outputs aliased to the donated averages, temporaries;
- what the XLA runtime keeps after the first update (its compilation and executable): the
  resident growth of the first update's stage.

The measuring child process is `benchmarks/memory_probe.py`.

    python -m benchmarks.memory_benchmark --backend=jax
    python -m benchmarks.memory_benchmark --backend=jax --quick --output_dir /tmp/bench
"""

import os
import sys

from benchmarks import backend_flag

# Before any import of Keras (see `benchmarks/backend_flag.py`): the child processes inherit it.
if __name__ == "__main__":
    backend_flag.select_from_argv()

import json  # noqa: E402
import subprocess  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import flags as bench_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_params", 100_000_000, "Number of fp32 parameters.")
flags.DEFINE_integer("tensor_size", 4_000_000, "Floats per weight tensor.")
flags.DEFINE_integer("updates", 3, "How many update() calls to run (the first one compiles).")
backend_flag.define_flag("memory_benchmark")

NAME = "memory_benchmark"
TARGET = 1.05

STAGES = ("averages_created", "first_update", "later_updates", "swap")
# The stages the target applies to: the state when created, and the steady-state update (the
# first update also holds XLA's compilation; swap holds the weights' backup by design).
TARGET_STAGES = ("averages_created", "later_updates")
MIB = 2**20


def _measure(nonfinite):
    """Runs `benchmarks/memory_probe.py` in a fresh process and returns its JSON."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND=FLAGS.backend)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), root] if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_probe", FLAGS.backend, str(FLAGS.num_params),
         str(FLAGS.tensor_size), str(FLAGS.updates), nonfinite],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"benchmarks.memory_probe ({FLAGS.backend}, nonfinite={nonfinite!r}) failed with "
            f"exit status {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_copies(measured, param_bytes):
    """Each stage's peak over the weights and growth within it, in copies of the parameters.

    Returns `(copies, source)`. From the device's memory stats when the probe recorded them
    (their peak is the peak since the process started), else from the process RSS (each
    stage's own peak).
    """
    stages = measured["stages"]
    on_device = stages["weights"].get("device_memory") is not None
    out = {}
    previous = "weights"
    for name in STAGES:
        s = stages[name]
        if on_device:
            peak = s["device_memory"]["peak_bytes_in_use"]
            base = stages["weights"]["device_memory"]["bytes_in_use"]
            begin = stages[previous]["device_memory"]["bytes_in_use"]
        else:
            peak, base, begin = s["peak"], stages["weights"]["end"], s["begin"]
        out[name] = {
            "extra_over_weights": (peak - base) / param_bytes,
            "growth_in_stage": (peak - begin) / param_bytes,
        }
        if "live_array_bytes" in s:
            live = s["live_array_bytes"] - stages["weights"]["live_array_bytes"]
            out[name]["live_arrays_over_weights"] = live / param_bytes
        previous = name
    return out, ("device memory_stats()" if on_device else "process RSS")


def _runtime_kept(stages):
    """What the XLA runtime keeps after the first update, beyond the weights and the state.

    In MiB. With device memory stats: the device bytes the first update added, and the host's
    resident growth in it (compiler, executable). Without (CPU, where the arrays are in RSS):
    the RSS at the first update's end minus the RSS with the weights alone minus the growth of
    the live arrays, and the same after `malloc_trim` (at the later updates' start).
    """
    first, weights = stages["first_update"], stages["weights"]
    if first.get("device_memory") is not None:
        before = stages["averages_created"]["device_memory"]["bytes_in_use"]
        return {
            "device_mib": (first["device_memory"]["bytes_in_use"] - before) / MIB,
            "host_rss_mib": (first["end"] - first["begin"]) / MIB,
        }
    arrays = first["live_array_bytes"] - weights["live_array_bytes"]
    return {
        "host_rss_mib": (first["end"] - weights["end"] - arrays) / MIB,
        "host_rss_after_trim_mib": (stages["later_updates"]["begin"] - weights["end"] - arrays)
        / MIB,
    }


def _state_copies(result, param_bytes):
    state = result["bytes"]["state_bytes"]
    return (state["averages"] + state["count"]) / param_bytes


def _jax_lines(results, param_bytes):
    """The JAX report's own lines: state bytes, memory source, compiled program, runtime."""
    lines = []
    for nonfinite, result in results.items():
        state = result["bytes"]["state_bytes"]
        copies = _state_copies(result, param_bytes)
        lines.append(
            f"averaging state, nonfinite={nonfinite!r}: {state['num_averages']} averages, "
            f"{state['averages']:,} bytes (sum of `nbytes`) + the count, {state['count']} "
            f"bytes = {copies:.6f}x the fp32 parameters: "
            f"{'met' if copies <= TARGET else 'NOT met'} (target <= {TARGET})."
        )
    first = next(iter(results.values()))["bytes"]
    if first["device_memory_stats_available"]:
        lines.append(
            f"memory source: `jax.local_devices()[0].memory_stats()` on {first['device']}: "
            "`extra over weights` is the peak bytes in use since the process started (JAX "
            "cannot reset it) minus the bytes in use with the weights alone."
        )
    else:
        lines.append(
            "memory source: `jax.local_devices()[0].memory_stats()` is None on "
            f"{first['device']}, so the stages are the process RSS (`/proc/self/status` VmHWM "
            "and VmRSS), which holds the arrays there; `live jax.Arrays over weights` sums the "
            "`nbytes` of `jax.live_arrays()` at each stage's end."
        )
    for nonfinite, result in results.items():
        compiled = result["bytes"]["compiled_update"]
        if compiled is None:
            lines.append(f"compiled update, nonfinite={nonfinite!r}: no memory_analysis() here.")
            continue
        fresh = compiled["output_size_in_bytes"] - compiled["alias_size_in_bytes"]
        lines.append(
            "compiled update program (XLA `memory_analysis()` of a rebuild of keras_swa's "
            f"update), nonfinite={nonfinite!r}: arguments "
            f"{compiled['argument_size_in_bytes'] / MIB:.1f} MiB, outputs "
            f"{compiled['output_size_in_bytes'] / MIB:.1f} MiB of which "
            f"{compiled['alias_size_in_bytes'] / MIB:.1f} MiB are written into the donated "
            f"averages ({fresh:,} bytes newly allocated), temporaries "
            f"{compiled['temp_size_in_bytes'] / MIB:.1f} MiB "
            f"({compiled['temp_size_in_bytes'] / param_bytes:.3f}x the parameters), generated "
            f"code {compiled['generated_code_size_in_bytes']:,} bytes."
        )
    temps = {k: (v["bytes"]["compiled_update"] or {}).get("temp_size_in_bytes")
             for k, v in results.items()}
    if None not in temps.values() and temps["raise"] > temps["ignore"]:
        added = temps["raise"] - temps["ignore"]
        lines.append(
            "the checked update's extra temporaries are its NaN/Inf test's: the exact "
            "per-element test (the `lax.cond` branch that runs only when the fast float32-sum "
            "test fails) materialises a bool per parameter, and XLA reserves that buffer "
            f"for every call ({added / FLAGS.num_params:.2f} bytes per parameter, "
            f"{added / (4 * FLAGS.num_params):.2f}x the fp32 parameters). On CPU its "
            "pages become resident only when that branch runs, so RSS does not show it; on an "
            "accelerator the allocator would have to provide it (not measured here)."
        )
    kept = {k: v["xla_runtime_kept_mib"] for k, v in results.items()}
    if "device_mib" in kept["raise"]:
        lines.append(
            "XLA runtime kept after the first update, beyond the weights and the state: device "
            "bytes in use added by the first update, and the host RSS growth in it (compiler, "
            "executable): "
            + ", ".join(f"nonfinite={k!r} {v['device_mib']:.1f} MiB on the device, "
                        f"{v['host_rss_mib']:.0f} MiB on the host" for k, v in kept.items())
            + "."
        )
    else:
        lines.append(
            "XLA runtime kept after the first update, beyond the weights and the state (RSS "
            "at its end minus RSS with the weights alone minus the live arrays' growth: the "
            "compiled program, its executable and allocator caches): "
            + ", ".join(f"nonfinite={k!r} {v['host_rss_mib']:.0f} MiB "
                        f"({v['host_rss_after_trim_mib']:.0f} MiB after malloc_trim)"
                        for k, v in kept.items())
            + "."
        )
    return lines


def main(_):
    bench_flags.validate_common_flags()
    from keras_swa.backend import keras

    backend_flag.check_loaded(keras, NAME)
    on_jax = FLAGS.backend == "jax"
    if FLAGS.quick:
        FLAGS.num_params = 4_000_000
        FLAGS.tensor_size = 500_000
    if FLAGS.num_params < 1 or FLAGS.tensor_size < 1 or FLAGS.updates < 2:
        raise app.UsageError(
            "--num_params and --tensor_size must be positive and --updates at least 2. "
            f"Received: num_params={FLAGS.num_params}, tensor_size={FLAGS.tensor_size}, "
            f"updates={FLAGS.updates}"
        )
    machine = bench_flags.machine_info()
    param_bytes = 4 * FLAGS.num_params
    rows, results, notes = [], {}, []
    source = "process RSS"
    for nonfinite in ("raise", "ignore"):
        measured = _measure(nonfinite)
        stages = measured["stages"]
        summary, source = _in_copies(measured, param_bytes)
        for name in STAGES:
            extra = summary[name]["extra_over_weights"]
            row = [f"nonfinite={nonfinite!r}", name, f"{extra:.3f}",
                   f"{summary[name]['growth_in_stage']:.3f}"]
            if on_jax:
                row.append(f"{summary[name]['live_arrays_over_weights']:.3f}")
            verdict = "met" if extra <= TARGET else "NOT met"
            rows.append(row + [verdict if name in TARGET_STAGES else "not a target"])
        kept = (stages["first_update"]["end"] - stages["first_update"]["begin"]) / MIB
        summary["first_update_resident_growth_mib"] = kept
        start_up = stages["xla_start_up"]
        summary["xla_start_up_mib"] = (start_up["peak"] - start_up["begin"]) / MIB
        results[nonfinite] = {"bytes": measured, "in_param_copies": summary}
        if on_jax:
            results[nonfinite]["xla_runtime_kept_mib"] = _runtime_kept(stages)
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
    if on_jax and source == "process RSS":
        notes.append(
            "the averages start as zeros, whose pages the OS maps only when they are first "
            "written: RSS sees them in first_update (growth ~1.0 there, with XLA's compilation "
            "of the update), so averages_created understates them; the live-arrays column and "
            "the state line count them from creation. later_updates are the steady state, "
            "after malloc_trim; `growth in stage` ~0 means the update runs in place (the "
            "averages are donated to it)."
        )
    else:
        notes.append(
            "first_update includes XLA's compilation of the update (memory set by the number "
            "of tensors and the program, not by the parameter count); resident growth in that "
            "stage: "
            + ", ".join(f"{k} {v['in_param_copies']['first_update_resident_growth_mib']:.0f} MiB"
                        for k, v in results.items())
            + ". later_updates are the steady state, after malloc_trim; `growth in stage` ~0 "
            "means the update runs in place."
        )
    if on_jax:
        notes.append(
            "swap (not a target) grows by "
            + ", ".join(f"{k} {v['in_param_copies']['swap']['growth_in_stage']:.2f}"
                        for k, v in results.items())
            + " copies of the parameters on JAX: a `jax.Array` is immutable, so the averages go "
            "into the weights as new arrays (one copy each, made from the averages' own "
            "arrays) while `swap()` keeps the weights' old arrays to restore them; one copy is "
            "the floor."
        )
    title = (
        f"# Peak memory of the SWA state: {FLAGS.num_params:,} fp32 parameters "
        f"({param_bytes / MIB:.0f} MiB) in tensors of {FLAGS.tensor_size:,}"
    )
    intro = (
        "Peak resident memory in copies of the fp32 parameter bytes: `extra over weights` is "
        f"the stage's peak minus the weights alone (target <= {TARGET}), `growth in stage` the "
        "stage's peak minus the memory when it began."
    )
    headers = ["variant", "stage", "extra over weights", "growth in stage"]
    jax_lines = []
    extra_versions = {}
    if on_jax:
        import jax

        extra_versions["jax"] = jax.__version__
        device = results["raise"]["bytes"]["device"]
        title += f"; Keras 3 on JAX {jax.__version__} ({device})"
        intro = intro.replace("Peak resident memory", f"Peak memory ({source})")
        headers.append("live jax.Arrays over weights")
        jax_lines = _jax_lines(results, param_bytes)
        notes.append(
            f"{machine['cpu_model']}, {machine['cpu_count']} CPUs; load average "
            f"{machine.get('load_average_at_start')} at the start, "
            f"{bench_flags.machine_info().get('load_average_at_start')} at the end (the memory "
            "figures do not depend on it)."
        )
    headers.append("target")
    table = (
        f"{title}\n\n"
        f"`{bench_flags.command_line('benchmarks.memory_benchmark')}`\n\n"
        f"{intro}\n\n"
        + bench_flags.markdown_table(headers, rows)
        + "\n\n" + "".join(f"- {line}\n" for line in jax_lines)
        + "\n".join(f"- note: {n}" for n in notes) + "\n"
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
        for stage in TARGET_STAGES
    ]
    config = {"quick": FLAGS.quick, "num_params": FLAGS.num_params,
              "tensor_size": FLAGS.tensor_size, "updates": FLAGS.updates}
    name = NAME
    if on_jax:
        name = f"{NAME}_jax"
        targets += [
            {
                "name": f"averaging state bytes (averages + count), nonfinite={nonfinite!r}",
                "value": _state_copies(result, param_bytes),
                "target": TARGET,
                "met": _state_copies(result, param_bytes) <= TARGET,
            }
            for nonfinite, result in results.items()
        ]
        config.update(backend="jax", device=results["raise"]["bytes"]["device"],
                      memory_source=source)
    labels = [f"{r[0]} {r[1]}" for r in rows]
    values = [float(r[2]) for r in rows]
    payload = {"benchmark": name,
               "command": bench_flags.command_line("benchmarks.memory_benchmark"),
               "machine": bench_flags.machine_info() if not on_jax else machine,
               "config": config,
               "param_bytes": param_bytes, "target": TARGET, "targets": targets,
               "results": results, "notes": notes,
               "versions": bench_flags.versions(**extra_versions)}
    if on_jax:
        payload["report_lines"] = jax_lines
    bench_flags.write_results(
        name,
        payload,
        table,
        lambda path: bench_flags.save_bar_plot(
            path, labels, values, values, values,
            "extra peak memory / fp32 parameter bytes" + (f" ({source})" if on_jax else ""),
            "SWA state memory" + (" (JAX)" if on_jax else ""),
            reference=(TARGET, f"target {TARGET}x")),
    )


if __name__ == "__main__":
    app.run(main)
