"""Flags and helpers shared by the keras_swa cost benchmarks.

Every benchmark in this folder is an absl script (`python -m benchmarks.NAME`) that measures its
variants side by side in ONE run: the variants are interleaved round-robin (the starting variant
rotates each round), the first `--warmup` rounds are discarded, and every figure reported is a
median over the remaining `--repeats` rounds. Ratios are medians of the per-round ratios, so that a
slow spell of the (shared, noisy) machine hits both sides of a ratio alike.

Each run writes three files into `--output_dir`: `NAME.json` (configuration, machine, versions,
date, every timing and ratio), `NAME.md` (the table printed to stdout) and `NAME.png` (a plot).
"""

import datetime
import importlib
import json
import os
import platform
import statistics
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "output_dir",
    os.path.join("benchmarks", "results"),
    "Folder that receives NAME.json, NAME.md and NAME.png (created if missing).",
)
flags.DEFINE_integer(
    "repeats",
    None,
    "Number of measured rounds (each round runs every variant once). Defaults to the "
    "benchmark's own default, smaller with --quick.",
)
flags.DEFINE_integer(
    "warmup",
    None,
    "Number of discarded rounds before the measured ones (tracing, XLA compilation, caches). "
    "Defaults to the benchmark's own default.",
)
flags.DEFINE_bool(
    "quick",
    False,
    "Tiny sizes so that a run takes seconds (CI smoke tests). The numbers mean little.",
)

__all__ = [
    "FLAGS",
    "busiest_load",
    "command_line",
    "interleave",
    "machine_info",
    "markdown_table",
    "paired_ratio",
    "rounds",
    "save_bar_plot",
    "summarize",
    "validate_common_flags",
    "versions",
    "write_results",
]


def validate_common_flags():
    """Raises `app.UsageError` naming the bad value if a shared flag is out of range."""
    if FLAGS.repeats is not None and FLAGS.repeats < 1:
        raise app.UsageError(
            f"`--repeats` must be a positive integer. Received: repeats={FLAGS.repeats}"
        )
    if FLAGS.warmup is not None and FLAGS.warmup < 0:
        raise app.UsageError(
            f"`--warmup` must be a non-negative integer. Received: warmup={FLAGS.warmup}"
        )
    if not FLAGS.output_dir:
        raise app.UsageError(
            f"`--output_dir` must be a folder path. Received: output_dir={FLAGS.output_dir!r}"
        )


def command_line(module):
    """The command that reproduces this run, e.g. `python -m benchmarks.x --quick`."""
    return " ".join(["python", "-m", module] + sys.argv[1:])


def rounds(default_repeats, default_warmup, quick_repeats, quick_warmup):
    """Returns `(repeats, warmup)`: the flags if given, else the (quick) defaults."""
    repeats = FLAGS.repeats
    if repeats is None:
        repeats = quick_repeats if FLAGS.quick else default_repeats
    warmup = FLAGS.warmup
    if warmup is None:
        warmup = quick_warmup if FLAGS.quick else default_warmup
    return repeats, warmup


def interleave(variants, repeats, warmup, log=None):
    """Runs `variants` round-robin and collects what each call returns.

    Round `r` calls every variant once, starting at variant `r % len(variants)`, so that no
    variant always runs first (after a pause) or last.

    Args:
        variants: dict `name -> callable()`; each call returns one measurement.
        repeats: number of measured rounds.
        warmup: number of discarded rounds run first.
        log: optional `callable(str)` told about each round.

    Returns:
        dict `name -> list` of the measurements of the `repeats` measured rounds, in order.
    """
    names = list(variants)
    out = {name: [] for name in names}
    for r in range(warmup + repeats):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            value = variants[name]()
            if r >= warmup:
                out[name].append(value)
        if log is not None:
            kind = "warm-up" if r < warmup else "measured"
            log(f"round {r + 1}/{warmup + repeats} ({kind}) done")
    return out


def summarize(samples):
    """Median, quartiles, min and max of a list of numbers (a dict of floats)."""
    samples = sorted(float(s) for s in samples)
    if len(samples) >= 2:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = q3 = samples[0]
    return {
        "median": statistics.median(samples),
        "p25": q1,
        "p75": q3,
        "min": samples[0],
        "max": samples[-1],
        "count": len(samples),
    }


def paired_ratio(numerators, denominators):
    """Median of the per-round ratios `numerators[i] / denominators[i]`."""
    if len(numerators) != len(denominators):
        raise ValueError(
            "Paired ratios need as many numerators as denominators. "
            f"Received: {len(numerators)} and {len(denominators)}"
        )
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib():
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info():
    """A description of this machine: OS, CPU model and counts, memory, load average."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": sys.version.split()[0],
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def busiest_load(machine):
    """The highest load average (1, 5 or 15 minutes) at the start (`machine`) and now, or 0.0.

    A value above the CPU count means other processes shared the cores during the run.
    """
    loads = [machine.get("load_average_at_start"), machine_info().get("load_average_at_start")]
    return max((max(load) for load in loads if load), default=0.0)


def versions(**extra):
    """Versions of Python, numpy, TensorFlow, the Keras in use and keras_swa (plus `extra`).

    Also records where keras_swa was imported from (an installed wheel or a source tree).
    """
    import numpy as np

    import keras_swa
    from keras_swa import lazy_tensorflow, version
    from keras_swa.backend import IS_KERAS_3, keras

    out = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "tensorflow": importlib.import_module("tensorflow").__version__
        if lazy_tensorflow.available() else "not installed",
        "keras": keras.__version__,
        "keras_flavour": "keras 3" if IS_KERAS_3 else "tf_keras (Keras 2)",
        "keras_swa": version.__version__,
        "keras_swa_path": os.path.dirname(os.path.abspath(keras_swa.__file__)),
    }
    out.update(extra)
    return out


def markdown_table(headers, rows):
    """A GitHub markdown table from a header list and a list of row lists."""
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def save_bar_plot(path, labels, values, lows, highs, ylabel, title, reference=None):
    """Saves a horizontal bar chart with quartile whiskers as a PNG (matplotlib, Agg backend).

    Args:
        path: the PNG file to write.
        labels: one label per bar.
        values: bar lengths (medians).
        lows: lower whisker ends (25th percentiles).
        highs: upper whisker ends (75th percentiles).
        ylabel: the value axis label.
        title: the plot title.
        reference: optional `(value, label)` drawn as a vertical dashed line (a floor or a
            target). Defaults to `None`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(labels)))
    positions = list(range(len(labels)))[::-1]
    err = [
        [max(v - lo, 0.0) for v, lo in zip(values, lows)],
        [max(hi - v, 0.0) for v, hi in zip(values, highs)],
    ]
    ax.barh(positions, values, xerr=err, color="#4c72b0", capsize=3)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels)
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    for pos, value, high in zip(positions, values, highs):
        ax.text(max(value, high), pos, f"  {value:.3g}", va="center", fontsize=8)
    ax.set_xlim(0, 1.12 * max(max(values), max(highs)))
    if reference is not None:
        ax.axvline(reference[0], color="#c44e52", linestyle="--", label=reference[1])
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(name, payload, table, plot):
    """Writes `name`.json, `name`.md and `name`.png into `--output_dir`.

    Args:
        name: the file stem, e.g. `"averaging_benchmark"`.
        payload: a JSON-serializable dict; `date`, `command` and `machine` are added if missing
            (the machine's load average at the end is always added).
        table: the markdown text for `name.md`.
        plot: `callable(path)` that writes the PNG.

    Returns:
        dict with the three paths written.
    """
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat())
    payload.setdefault("command", " ".join(["python"] + sys.argv))
    payload.setdefault("machine", machine_info())
    if hasattr(os, "getloadavg"):
        payload["machine"] = dict(payload["machine"])
        payload["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    paths = {
        "json": os.path.join(FLAGS.output_dir, f"{name}.json"),
        "md": os.path.join(FLAGS.output_dir, f"{name}.md"),
        "png": os.path.join(FLAGS.output_dir, f"{name}.png"),
    }
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(table.rstrip() + "\n")
    plot(paths["png"])
    return paths
