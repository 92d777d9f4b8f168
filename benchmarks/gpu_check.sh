#!/usr/bin/env bash
# The JAX cost benchmarks (issue 13) on a machine with JAX + CUDA. Not run in CI.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      # from the repository root, under 5 minutes
#
# Figures go to OUTPUT_DIR (default: $OUT if set, else benchmarks/results/gpu). Where keras_swa
# imports (Keras 3 and JAX; TensorFlow is not needed on JAX) it runs, each under its own time
# limit (120 + 75 + 90 s):
#   python -m benchmarks.averaging_benchmark --backend=jax     (keras_swa's rows, the donated
#       flat-lerp floor, torch's rows on CUDA if torch is there)
#   python -m benchmarks.memory_benchmark --backend=jax        (100M parameters; device memory
#       from memory_stats(), XLA's memory_analysis() of the update)
#   python -m benchmarks.fit_overhead_benchmark --backend=jax --repeats=4
# and exits non-zero if any of them failed. A machine with JAX but without Keras (or absl-py)
# gets Keras from wheels carried along (keras and its pure-Python requirements: absl-py, h5py,
# ml-dtypes, namex, optree, packaging, rich, markdown-it-py, mdurl, pygments) on PYTHONPATH.
# Where keras_swa cannot be imported at all, it says why and times only what runs without it:
# the same floor, and keras_swa's update rebuilt in pure JAX (one donated jax.jit over the
# per-tensor averages, with and without the NaN/Inf check), with XLA's memory_analysis() of that
# program and the device's memory_stats(), written to OUTPUT_DIR/gpu_check_pure_jax.{json,md}.
# PYTHON picks the interpreter (default: python).
set -u
PYTHON=${PYTHON:-python}
OUTPUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUTPUT_DIR"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2

echo "== JAX devices"
"$PYTHON" -c "import jax; print(jax.__version__, jax.devices())" || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv

if "$PYTHON" -c "import absl, keras_swa"; then
  failed=0
  echo "== keras_swa imports: JAX averaging benchmark"
  timeout 120 "$PYTHON" -m benchmarks.averaging_benchmark --backend=jax \
    --output_dir "$OUTPUT_DIR" || failed=1
  echo "== JAX memory benchmark"
  timeout 75 "$PYTHON" -m benchmarks.memory_benchmark --backend=jax \
    --output_dir "$OUTPUT_DIR" || failed=1
  echo "== JAX fit overhead benchmark"
  timeout 90 "$PYTHON" -m benchmarks.fit_overhead_benchmark --backend=jax --repeats=4 \
    --output_dir "$OUTPUT_DIR" || failed=1
  exit $failed
fi

echo "== keras_swa (or absl-py) does NOT import here (the error above says why), so there are no"
echo "   keras_swa rows. Timing only the floor and a pure-JAX rebuild of keras_swa's update."
timeout 270 "$PYTHON" - "$OUTPUT_DIR" <<'PYEOF'
import functools, json, os, statistics, sys, time

import jax
import jax.numpy as jnp
import numpy as np

out_dir = sys.argv[1]
try:
    import keras

    model = keras.applications.ResNet50(weights=None)
    shapes = [tuple(int(d) for d in w.shape) for w in model.trainable_weights]
    del model
except Exception as e:  # no Keras: the sizes alone (ResNet-50 has 25,583,592 trainable floats)
    print(f"ResNet-50 shapes unavailable ({e}); one tensor of ResNet-50's size instead")
    shapes = [(25_583_592,)]
rng = np.random.default_rng(0)
arrays = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
num_floats = sum(int(a.size) for a in arrays)


def lerp(average, w, n):
    return average + (w - average) / (n + 1.0)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def flat_step(average, n, w):
    return lerp(average, w, n), n + 1.0


def multi(check):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(averages, n, ws):
        ok = jnp.asarray(True)
        if check:  # keras_swa's fast test: the float32 total of the sums is finite
            ok = jnp.isfinite(sum(jnp.sum(w) for w in ws))
        new = [jnp.where(ok, lerp(a, w, n), a) for a, w in zip(averages, ws)]
        return new, jnp.where(ok, n + 1.0, n)

    state = {"a": [jnp.zeros_like(w) for w in arrays], "n": jnp.zeros([], jnp.float32)}
    analysis = step.lower(state["a"], state["n"], arrays).compile().memory_analysis()
    memory[check] = None if analysis is None else {
        k: int(getattr(analysis, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                               "alias_size_in_bytes", "temp_size_in_bytes")}

    def run():
        state["a"], state["n"] = step(state["a"], state["n"], arrays)
        jax.block_until_ready(state["a"])

    return run


def floor():
    w = jnp.concatenate([a.ravel() for a in arrays])
    state = {"a": jnp.zeros_like(w), "n": jnp.zeros([], jnp.float32)}

    def run():
        state["a"], state["n"] = flat_step(state["a"], state["n"], w)
        jax.block_until_ready(state["a"])

    return run


memory = {}  # check -> XLA's memory_analysis() of the multi-tensor update
device_memory_before = jax.local_devices()[0].memory_stats()
FLOOR = "floor: one flat jit lerp (JAX/XLA, donated)"
variants = {
    FLOOR: floor(),
    "pure JAX multi-tensor update, NaN/Inf check (keras_swa's program, no keras_swa)": multi(True),
    "pure JAX multi-tensor update, no check (nonfinite=ignore's program)": multi(False),
}
names = list(variants)
repeats, warmup = 100, 10
times = {k: [] for k in names}
for r in range(warmup + repeats):  # interleaved rounds, rotating start, as the benchmark
    for k in names[r % len(names):] + names[: r % len(names)]:
        start = time.perf_counter()
        variants[k]()
        if r >= warmup:
            times[k].append(time.perf_counter() - start)
rows = []
for k in names:
    ratio = statistics.median(a / b for a, b in zip(times[k], times[FLOOR]))
    rows.append({"name": k, "median_ms": statistics.median(times[k]) * 1e3,
                 "min_ms": min(times[k]) * 1e3, "ratio_to_floor": ratio})
lines = [f"# Pure-JAX averaging check (no TensorFlow, no keras_swa): {len(shapes)} tensors, "
         f"{num_floats:,} floats, {jax.devices()[0]}", "",
         f"{repeats} interleaved rounds after {warmup}; ratios are medians of per-round ratios.",
         "", "| variant | ms (median) | min ms | x floor |", "| --- | --- | --- | --- |"]
lines += [f"| {r['name']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['ratio_to_floor']:.2f} |"
          for r in rows]
param_bytes = 4 * num_floats
for check, m in memory.items():
    lines.append("")
    if m is None:
        lines.append(f"- compiled update (check={check}): no memory_analysis() on this backend")
        continue
    lines.append(
        f"- compiled update (check={check}; the fast NaN/Inf test only, without keras_swa's "
        f"exact-test branch), XLA memory_analysis(): arguments "
        f"{m['argument_size_in_bytes'] / 2**20:.1f} MiB, outputs {m['output_size_in_bytes'] / 2**20:.1f}"
        f" MiB ({m['alias_size_in_bytes'] / 2**20:.1f} MiB into the donated averages), temporaries "
        f"{m['temp_size_in_bytes'] / 2**20:.1f} MiB = {m['temp_size_in_bytes'] / param_bytes:.3f}x "
        "the fp32 parameters")
device_memory = jax.local_devices()[0].memory_stats()
lines.append("")
lines.append(f"- device memory_stats() before the averages: {device_memory_before}; at the end "
             f"(weights, flat copy, three sets of averages): {device_memory}")
print("\n".join(lines))
payload = {"benchmark": "gpu_check_pure_jax", "jax": jax.__version__,
           "device": str(jax.devices()[0]), "num_tensors": len(shapes), "num_floats": num_floats,
           "repeats": repeats, "warmup": warmup, "results": rows,
           "compiled_update_memory": {str(k): v for k, v in memory.items()},
           "device_memory_stats": {"before_averages": device_memory_before, "end": device_memory},
           "timings_s": times}
with open(os.path.join(out_dir, "gpu_check_pure_jax.json"), "w") as f:
    json.dump(payload, f, indent=2)
with open(os.path.join(out_dir, "gpu_check_pure_jax.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"Wrote {out_dir}/gpu_check_pure_jax.{{json,md}}")
PYEOF
