"""One process's memory while SWA's averaging state is made and used (`memory_benchmark`'s child).

    python -m benchmarks.memory_probe BACKEND NUM_PARAMS TENSOR_SIZE UPDATES NONFINITE

runs in a fresh process (so nothing earlier is in its memory), on Keras 3's `BACKEND`
(`tensorflow` or `jax`; `KERAS_BACKEND` must already say the same), and prints one JSON line.
It creates `NUM_PARAMS` fp32 weights in tensors of `TENSOR_SIZE` floats, then
`AveragedWeights(weights, nonfinite=NONFINITE)`, runs `update()` `UPDATES` times and `swap()`
once. Each stage records Linux's `/proc/self/status` `VmRSS` when it began and ended and `VmHWM`
(the peak); before the later updates and before the swap the peak is reset
(`/proc/self/clear_refs`), and before the later updates the C allocator's free memory is returned
to the system (`malloc_trim`), so those stages show what the update holds, not what the compiler
left free. XLA's one-time start-up (a tiny jit-compiled function) is its own first stage.

On JAX each stage also records the bytes of every live `jax.Array` (`jax.live_arrays()`) and the
device's `memory_stats()` (None on CPU, where the arrays are in the process's memory and RSS sees
them). After the stages it records the averaging state's bytes (the averages' `nbytes` plus the
count's) and the memory of the update's compiled program from XLA
(`jax.jit(...).lower(...).compile().memory_analysis()`), for a rebuild of keras_swa's update:
keras_swa does not expose its own compiled program, so the same program is built here from the
public `keras_swa.averaging.swa_update` (SWA mode), with the same donation and NaN/Inf test.
"""

import ctypes
import json
import os
import sys

BACKENDS = ("tensorflow", "jax")


def status(key):
    """A `/proc/self/status` field in bytes (`VmRSS`: resident now, `VmHWM`: resident peak)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    raise RuntimeError(key + " not in /proc/self/status")


def reset_peak():
    """Resets `VmHWM` to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim():
    """Returns the C allocator's free memory to the system; False without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def sizes_of(num_params, tensor_size):
    """The tensor sizes: as many `tensor_size` tensors as fit, then the remainder."""
    sizes = [tensor_size] * (num_params // tensor_size)
    if num_params % tensor_size:
        sizes.append(num_params % tensor_size)
    return sizes


class Stages:
    """Records each stage's RSS at its start and end and its peak (plus `extra()`'s fields)."""

    def __init__(self, extra=None):
        self.stages = {}
        self._extra = extra
        self.begin()

    def begin(self):
        self._begin = status("VmRSS")

    def end(self, name):
        record = {"begin": self._begin, "peak": status("VmHWM"), "end": status("VmRSS")}
        if self._extra is not None:
            record.update(self._extra())
        self.stages[name] = record
        self.begin()


def run_tensorflow(num_params, tensor_size, updates, nonfinite):
    import tensorflow as tf

    from keras_swa.averaged_weights import AveragedWeights

    stages = Stages()
    # XLA's one-time start-up in this process (compiler, thread pools), which any jit-compiled
    # training step pays as well: measured on its own, before the weights.
    tf.function(lambda x: tf.reduce_sum(x * 2.0) + 1.0, jit_compile=True)(tf.ones([1000]))
    stages.end("xla_start_up")
    weights = [
        tf.Variable(tf.fill([size], 0.5 + i), trainable=True)
        for i, size in enumerate(sizes_of(num_params, tensor_size))
    ]
    stages.end("weights")
    averaged = AveragedWeights(weights, nonfinite=nonfinite)
    stages.end("averages_created")
    averaged.update()
    stages.end("first_update")
    return _steady_state(stages, averaged, updates)


def _steady_state(stages, averaged, updates):
    """The later updates and the swap, each with its own peak; returns the JSON payload."""
    trimmed = trim()
    resets = reset_peak()
    stages.begin()
    for _ in range(updates - 1):
        averaged.update()
    stages.end("later_updates")
    resets = reset_peak() and resets
    stages.begin()
    with averaged.swap():
        pass
    stages.end("swap")
    return {"stages": stages.stages, "peak_reset": resets, "malloc_trim": trimmed}


def _device_memory(device):
    """The device's bytes in use and peak, or None where JAX does not report them (CPU)."""
    stats = device.memory_stats()
    if not stats:
        return None
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def run_jax(num_params, tensor_size, updates, nonfinite):
    import jax
    import jax.numpy as jnp

    from keras_swa.averaged_weights import AveragedWeights
    from keras_swa.backend import keras

    device = jax.local_devices()[0]

    def extra():
        return {
            "live_array_bytes": sum(a.nbytes for a in jax.live_arrays()),
            "device_memory": _device_memory(device),
        }

    stages = Stages(extra)
    jax.block_until_ready(jax.jit(lambda x: jnp.sum(x * 2.0) + 1.0)(jnp.ones([1000])))
    stages.end("xla_start_up")
    sizes = sizes_of(num_params, tensor_size)
    weights = [
        keras.Variable(jnp.full([size], 0.5 + i, jnp.float32), trainable=True)
        for i, size in enumerate(sizes)
    ]
    stages.end("weights")
    averaged = AveragedWeights(weights, nonfinite=nonfinite)
    stages.end("averages_created")
    averaged.update()
    stages.end("first_update")
    payload = _steady_state(stages, averaged, updates)
    # After the stages: `averages` hands out copies, which would blur the peaks above.
    averages = averaged.averages
    payload["state_bytes"] = {
        "averages": int(sum(a.nbytes for a in averages)),
        "count": int(averaged.n_averaged.value.nbytes),
        "num_averages": len(averages),
    }
    del averages
    payload["compiled_update"] = compiled_update_memory(sizes, check=nonfinite != "ignore")
    payload["device"] = str(device)
    payload["device_memory_stats_available"] = _device_memory(device) is not None
    return payload


def compiled_update_memory(sizes, check):
    """XLA's `memory_analysis()` of the update program for fp32 tensors of `sizes`."""
    import jax
    import jax.numpy as jnp

    from keras_swa.averaging import swa_update

    def update(averages, count, values):
        ok = jnp.asarray(True)
        if check:  # the fast test, and the exact one only when it fails
            total = sum(jnp.sum(v) for v in values)
            ok = jax.lax.cond(
                jnp.isfinite(total),
                lambda: jnp.asarray(True),
                lambda: jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values])),
            )
        new = [jnp.where(ok, swa_update(a, v, count), a) for a, v in zip(averages, values)]
        return new, jnp.where(ok, count + 1, count), ok

    arrays = [jax.ShapeDtypeStruct((size,), jnp.float32) for size in sizes]
    count = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(arrays, count, arrays).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {k: int(getattr(analysis, k)) for k in fields if hasattr(analysis, k)}


def main(argv):
    backend, num_params, tensor_size, updates, nonfinite = argv
    if backend not in BACKENDS:
        raise SystemExit(f"BACKEND must be one of {BACKENDS}. Received: {backend!r}")
    if os.environ.get("KERAS_BACKEND", "tensorflow") != backend:
        raise SystemExit(
            f"KERAS_BACKEND must be {backend!r}. Received: {os.environ.get('KERAS_BACKEND')!r}"
        )
    run = run_jax if backend == "jax" else run_tensorflow
    payload = run(int(num_params), int(tensor_size), int(updates), nonfinite)
    print(json.dumps(payload))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(sys.argv[1:])
