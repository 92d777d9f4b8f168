"""What SWA costs, in one report: every cost target of keras_swa measured by one command.

Runs the cost benchmarks one after the other, each in its own process (so that one's memory
and thread pools do not disturb the next's measurements), exactly as they run alone:

- `averaging_benchmark`: `AveragedWeights.update()` on ResNet-50-shaped variables vs the
  memory-bound floor (one flat-buffer XLA update of the same number of floats) and vs torch's
  foreach multi-average when torch is importable;
- `fit_overhead_benchmark`: `model.fit` with the `SWA` callback capturing every epoch and every
  step vs plain `fit`, and one `update_bn` pass vs one training epoch;
- `memory_benchmark`: peak memory growth of averaging a 100M-parameter model vs one fp32 copy of
  the parameters.

Each part measures its variants side by side in one run (interleaved rounds, medians of the
per-round ratios; see `benchmarks/flags.py`) and writes its own JSON/markdown/PNG into
`--output_dir`/cost_parts. This script collects every part's `targets` (measured value, target,
met or not) into `cost_benchmark.json`, one table `cost_benchmark.md` and a plot
`cost_benchmark.png` of each value relative to its target (<= 1 means met).

Run (from the repository root; about 10 minutes on 2 CPU cores):

    python -m benchmarks.cost_benchmark

Smoke test (seconds per part):

    python -m benchmarks.cost_benchmark --quick --output_dir /tmp/bench
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import flags as bench  # noqa: E402

FLAGS = flags.FLAGS
NAME = "cost_benchmark"
PARTS = ("averaging_benchmark", "fit_overhead_benchmark", "memory_benchmark")

flags.DEFINE_list("parts", list(PARTS), f"The cost benchmarks to run, a subset of {list(PARTS)}.")


def part_command(part, output_dir):
    """The command line that runs one part with this run's shared flags."""
    command = [sys.executable, "-m", f"benchmarks.{part}", "--output_dir", output_dir]
    if FLAGS.quick:
        command.append("--quick")
    if FLAGS.repeats is not None:
        command.append(f"--repeats={FLAGS.repeats}")
    if FLAGS.warmup is not None:
        command.append(f"--warmup={FLAGS.warmup}")
    return command


def run_part(part, output_dir):
    """Runs one part (its output streams through) and returns its JSON payload and wall time."""
    start = time.time()
    proc = subprocess.run(part_command(part, output_dir), check=False)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"The cost benchmark part `{part}` failed with exit status {proc.returncode} "
            "(its output is above)."
        )
    with open(os.path.join(output_dir, f"{part}.json"), encoding="utf-8") as f:
        return json.load(f), wall


def collect_targets(payloads):
    """One row per target of every part: part, name, value, target, met, value / target."""
    rows = []
    for part, payload in payloads.items():
        for target in payload.get("targets", []):
            value, limit = target.get("value"), target.get("target")
            rows.append(
                {
                    "part": part,
                    "name": target["name"],
                    "value": value,
                    "target": limit,
                    "met": target.get("met"),
                    "value_over_target": (
                        value / limit if value is not None and limit else None
                    ),
                    "note": target.get("note"),
                }
            )
    return rows


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"


def make_table(rows, walls):
    headers = ["benchmark", "measure", "value", "target", "met"]
    body = [
        [
            row["part"].replace("_benchmark", ""),
            row["name"],
            _fmt(row["value"]),
            f"<= {_fmt(row['target'])}",
            {True: "yes", False: "NO", None: "n/a"}[row["met"]]
            + (f" ({row['note']})" if row["note"] else ""),
        ]
        for row in rows
    ]
    met = sum(row["met"] is True for row in rows)
    timing = ", ".join(f"{part} {wall:.0f} s" for part, wall in walls.items())
    return (
        "## keras_swa cost targets\n\n"
        + bench.markdown_table(headers, body)
        + f"\n\n{met} of {len(rows)} targets met"
        + (" (quick mode: the numbers mean little)" if FLAGS.quick else "")
        + f". Parts: {timing}. Details per part in cost_parts/.\n"
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments. Received: {argv[1:]}")
    bench.validate_common_flags()
    unknown = [p for p in FLAGS.parts if p not in PARTS]
    if unknown or not FLAGS.parts:
        raise app.UsageError(
            f"`--parts` must be a non-empty subset of {list(PARTS)}. Received: parts={FLAGS.parts}"
        )
    parts_dir = os.path.join(FLAGS.output_dir, "cost_parts")
    os.makedirs(parts_dir, exist_ok=True)
    payloads, walls = {}, {}
    for part in FLAGS.parts:
        print(f"=== {part}", flush=True)
        payloads[part], walls[part] = run_part(part, parts_dir)
    rows = collect_targets(payloads)
    table = make_table(rows, walls)
    payload = {
        "benchmark": NAME,
        "command": bench.command_line("benchmarks." + NAME),
        "versions": bench.versions(),
        "config": {"quick": FLAGS.quick, "parts": list(FLAGS.parts)},
        "targets": rows,
        "parts": {
            part: {
                "command": payloads[part].get("command"),
                "json": os.path.join("cost_parts", f"{part}.json"),
                "wall_time_s": walls[part],
            }
            for part in FLAGS.parts
        },
    }

    def plot(path):
        shown = [row for row in rows if row["value_over_target"] is not None]
        if not shown:  # e.g. only parts without targets ran: an empty, labelled chart
            shown = [{"part": "none", "name": "no targets measured", "value_over_target": 0.0}]
        values = [row["value_over_target"] for row in shown]
        bench.save_bar_plot(
            path,
            [f"{row['part'].replace('_benchmark', '')}: {row['name']}" for row in shown],
            values,
            values,
            values,
            "measured / target (<= 1 is met)",
            "keras_swa cost targets",
            reference=(1.0, "target"),
        )

    paths = bench.write_results(NAME, payload, table, plot)
    print(table, flush=True)
    print(f"Wrote {paths['json']}, {paths['md']}, {paths['png']}.", flush=True)


if __name__ == "__main__":
    app.run(main)
