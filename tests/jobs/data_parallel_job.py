"""keras_swa under `keras.distribution.DataParallel` on 2 host devices (run as a subprocess).

    python tests/jobs/data_parallel_job.py OUT.npz

JAX sees its devices once, when it initialises, so the 2 CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`) and the JAX backend are set here, before
anything imports JAX; tests/test_data_parallel.py starts this job and checks what it writes
against numpy. Every scenario runs twice from the same initial weights: under
`DataParallel(devices=jax.devices())` (replicated variables, sharded batches) and with no
distribution, in this one process. It writes the recorded weights, the results of both runs and
facts about placement (device counts, shardings, traces) to OUT.npz; the checks are the parent's.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import keras_swa  # noqa: E402
from keras_swa.backend import keras  # noqa: E402
from keras_swa.backends import jax_batch_norm  # noqa: E402

OUT = {}


def record(key, value):
    OUT[key] = np.asarray(value)


def devices_of(value):
    """How many devices hold `value`, and is each holding all of it (replicated)?"""
    return len(value.sharding.device_set), bool(value.sharding.is_fully_replicated)


def placed_as(a, b):
    return bool(a.sharding.is_equivalent_to(b.sharding, a.ndim))


def mlp(name):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, name="d1")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(h)
    h = keras.layers.Dense(4, name="d2")(keras.layers.Activation("relu")(h))
    h = keras.layers.BatchNormalization(name="bn2")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h), name=name)


def with_distribution(distribution, fn):
    keras.distribution.set_distribution(distribution)
    try:
        return fn()
    finally:
        keras.distribution.set_distribution(None)


def start_and_steps(name, rng, steps=4):
    """The weights of a fresh `mlp(name)` and `steps` random changes of its trainable weights."""
    base = mlp(name)
    deltas = [[rng.normal(size=w.shape).astype("float32") for w in base.trainable_weights]
              for _ in range(steps)]
    return base.get_weights(), deltas


def take_step(model, delta, name):
    """Adds `delta` to the trainable weights and records them as `name_j` (weight `j`)."""
    for v, d in zip(model.trainable_variables, delta):
        v.assign(v.numpy() + d)
    for j, v in enumerate(model.trainable_variables):
        record(f"{name}_{j}", v.numpy())


def averaged_weights(distribution):
    """SWA, EMA and NaN-checked updates; assign_to/swap; reset and reload keep the placement."""
    rng = np.random.default_rng(0)
    weights, deltas = start_and_steps("base", rng)
    for tag, dist in (("dp", distribution), ("single", None)):
        for mode, kwargs in (("swa", {}), ("ema", {"mode": "ema", "decay": 0.75}),
                             ("ignore", {"nonfinite": "ignore"})):
            key = f"aw_{mode}_{tag}"

            def run():
                model = mlp(key)
                model.set_weights(weights)
                averaged = keras_swa.AveragedWeights(model, **kwargs)
                for i, delta in enumerate(deltas):
                    take_step(model, delta, f"{key}_snapshot{i}")
                    assert averaged.update() is True
                return model, averaged

            model, averaged = with_distribution(dist, run)
            record(f"{key}_count", int(averaged.n_averaged.numpy()))
            for j, a in enumerate(averaged.averages):
                record(f"{key}_average{j}", a)
            record(f"{key}_traces", averaged._jax.traces)
            if tag == "dp":
                variables = model.trainable_variables
                record(f"{key}_variable_devices", [devices_of(v.value) for v in variables])
                record(f"{key}_average_devices",
                       [devices_of(a.value) for a in averaged._jax.averages]
                       + [devices_of(averaged.n_averaged.value)])
                record(f"{key}_average_placed_as_variable",
                       [placed_as(a.value, v.value)
                        for a, v in zip(averaged._jax.averages, variables)])
            if mode == "swa" and tag == "dp":
                writing_back(model, averaged, key, dist)


def swag_and_fge(distribution):
    """SWAG's statistics and draws, FGE's members and ensemble, with and without the mesh."""
    rng = np.random.default_rng(1)
    weights, deltas = start_and_steps("swag_base", rng)
    x = rng.normal(size=(6, 5)).astype("float32")
    for tag, dist in (("dp", distribution), ("single", None)):
        key = f"swag_{tag}"

        def run():
            model = mlp(key)
            model.set_weights(weights)
            swag = keras_swa.SWAG(model, max_rank=3)
            fge = keras_swa.FGE(model)
            for i, delta in enumerate(deltas):
                take_step(model, delta, f"{key}_snapshot{i}")
                assert swag.update() is True
                if i >= 1:
                    fge.add()
            record(f"{key}_traces", swag._jax.traces)
            record(f"{key}_state_devices",
                   [devices_of(s.value) for group in (swag._jax.means, swag.m2s, swag.deviations)
                    for s in group] + [devices_of(swag.n_averaged.value)])
            for j, (mean, var, columns) in enumerate(
                    zip(swag.averages, swag.variances(), swag.deviation_columns())):
                record(f"{key}_mean{j}", mean)
                record(f"{key}_variance{j}", var)
                record(f"{key}_columns{j}", columns)
            for j, value in enumerate(swag.sample_vector(seed=3)):
                record(f"{key}_draw{j}", value)
            swag.sample(seed=3)
            record(f"{key}_sampled_devices",
                   [devices_of(v.value) for v in model.trainable_variables])
            for m, member in enumerate(fge.members):
                for j, w in enumerate(member):
                    record(f"{key}_fge{m}_{j}", np.asarray(w.numpy()))
            record(f"{key}_fge_devices", [devices_of(w.value) for w in fge.members[0]])
            record(f"{key}_fge_predict", fge.predict(x))
            record(f"{key}_fge_x", x)

        with_distribution(dist, run)


def writing_back(model, averaged, key, dist):
    """swap/assign_to, a refused NaN capture, reset and load_weights, under the distribution."""
    variables = model.trainable_variables

    def run():
        before = [v.numpy() for v in variables]
        with averaged.swap():
            record(f"{key}_swapped", [np.array_equal(v.numpy(), np.asarray(a))
                                      for v, a in zip(variables, averaged.averages)])
            record(f"{key}_swapped_devices", [devices_of(v.value) for v in variables])
        record(f"{key}_restored", [np.array_equal(v.numpy(), b)
                                   for v, b in zip(variables, before)])
        kept = [np.asarray(a) for a in averaged.averages]
        variables[0].assign(np.full(variables[0].shape, np.nan, "float32"))
        try:
            averaged.update()
            record(f"{key}_nan_refused", False)
        except FloatingPointError:
            record(f"{key}_nan_refused", True)
        record(f"{key}_nan_kept", [np.array_equal(k, np.asarray(a))
                                   for k, a in zip(kept, averaged.averages)])
        variables[0].assign(before[0])
        averaged.assign_to()
        record(f"{key}_assigned", [np.array_equal(v.numpy(), np.asarray(a))
                                   for v, a in zip(variables, averaged.averages)])
        record(f"{key}_assigned_devices", [devices_of(v.value) for v in variables])
        path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "dp.weights.h5")
        averaged.save_weights(path)
        averaged.reset()
        after_reset = [devices_of(a.value) for a in averaged._jax.averages]
        averaged.load_weights(path)
        record(f"{key}_reloaded", [np.array_equal(k, np.asarray(a))
                                   for k, a in zip(kept, averaged.averages)])
        averaged.update()  # same shardings as before: no new trace
        record(f"{key}_traces_after_reload", averaged._jax.traces)
        return after_reset + [devices_of(a.value) for a in averaged._jax.averages] + [
            devices_of(averaged.n_averaged.value)
        ]

    record(f"{key}_reset_reload_devices", with_distribution(dist, run))
    # Averages made after the distribution is unset sit with the (replicated) variables.
    late = keras_swa.AveragedWeights(model)
    late.update()
    record("aw_late_placed_as_variable",
           [placed_as(a.value, v.value) for a, v in zip(late._jax.averages, variables)])
    record("aw_late_devices", [devices_of(a.value) for a in late._jax.averages])
    # A model built on one device cannot have its averages laid out by the distribution.
    single = mlp("built_outside")

    def mixed():
        try:
            keras_swa.AveragedWeights(single)
        except ValueError as e:
            return str(e)
        return ""

    record("aw_mixed_error", with_distribution(dist, mixed))


def update_bn(distribution):
    """update_bn on 44 samples in batches of 16 (16, 16, 12: sharded) and on 45 (13: replicated)."""
    rng = np.random.default_rng(1)
    base = mlp("bn_base")
    weights = [w + rng.normal(size=w.shape).astype("float32") * 0.5 for w in base.get_weights()]
    x = (rng.normal(size=(45, 5)) * 2.0 + 1.0).astype("float32")
    record("bn_x", x)
    for tag, dist in (("dp", distribution), ("single", None)):
        for n in (44, 45):
            key = f"bn{n}_{tag}"

            def run():
                model = mlp(key)
                model.set_weights(weights)
                trainable = [v.numpy() for v in model.trainable_variables]
                seen = keras_swa.update_bn(model, x[:n], batch_size=16, verbose=0)
                record(f"{key}_seen", seen)
                record(f"{key}_trainable_kept", [np.array_equal(b, v.numpy()) for b, v in
                                                 zip(trainable, model.trainable_variables)])
                record(f"{key}_momenta", [model.get_layer(b).momentum for b in ("bn1", "bn2")])
                record(f"{key}_stat_devices",
                       [devices_of(v.value) for v in model.non_trainable_variables])
                passes = jax_batch_norm._PASSES.get(model, {})
                record(f"{key}_traces", sum(p.step.traces for p in passes.values()))
                if dist is not None:
                    sharded = jax_batch_norm._shard(x[:16], dist)
                    record(f"{key}_batch_shards",
                           [s.data.shape[0] for s in sharded.addressable_shards])
                return model

            model = with_distribution(dist, run)
            if n == 44 and tag == "dp":
                for layer in ("d1", "bn1", "d2"):
                    for j, w in enumerate(model.get_layer(layer).weights):
                        record(f"bn_weights_{layer}_{j}", w.numpy())
                record("bn_epsilon", [model.get_layer(b).epsilon for b in ("bn1", "bn2")])
            for b in ("bn1", "bn2"):
                layer = model.get_layer(b)
                record(f"{key}_{b}_mean", layer.moving_mean.numpy())
                record(f"{key}_{b}_variance", layer.moving_variance.numpy())


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self, key):
        super().__init__()
        self.key = key

    def on_epoch_end(self, epoch, logs=None):
        for j, v in enumerate(self.model.trainable_variables):
            record(f"{self.key}_epoch{epoch}_{j}", v.numpy())


def fit(distribution):
    """The SWA callback (captures, BN recompute, swa_validation_data) in `fit`."""
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(64, 5)) * 2.0 + 1.0).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    xv, yv = x[:32] + 0.1, y[:32]
    record("fit_x", x)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)
    out = keras.layers.Dense(1, name="out")(keras.layers.Activation("relu")(h))
    weights = keras.Model(inputs, out).get_weights()
    for tag, dist in (("dp", distribution), ("single", None)):
        key = f"fit_{tag}"

        def run():
            inputs = keras.Input((5,))
            h = keras.layers.Dense(6, name="dense_in")(inputs)
            h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)
            out = keras.layers.Dense(1, name="out")(keras.layers.Activation("relu")(h))
            model = keras.Model(inputs, out)
            model.set_weights(weights)
            model.compile(keras.optimizers.SGD(0.05), "mse")
            swa = keras_swa.SWA(start_epoch=1, cycle_length=1, swa_lr=0.02, bn_data=x,
                                bn_batch_size=16, swa_validation_data=(xv, yv), verbose=0)
            history = model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
                                callbacks=[swa, EpochRecorder(key)])
            record(f"{key}_captures", [epoch for epoch, _, _ in swa.captures])
            record(f"{key}_val_swa_loss", history.history["val_swa_loss"])
            record(f"{key}_traces", swa.averaged._jax.traces)
            record(f"{key}_variable_devices", [devices_of(v.value) for v in model.variables])
            record(f"{key}_average_devices",
                   [devices_of(a.value) for a in swa.averaged._jax.averages])
            return model

        model = with_distribution(dist, run)
        for j, v in enumerate(model.trainable_variables):
            record(f"{key}_final_{j}", v.numpy())
        bn = model.get_layer("bn")
        record(f"{key}_bn_mean", bn.moving_mean.numpy())
        record(f"{key}_bn_variance", bn.moving_variance.numpy())
        record(f"{key}_bn_momentum", bn.momentum)


def main():
    record("devices", len(jax.devices()))
    record("keras_swa_file", keras_swa.__file__)
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    record("mesh_devices", distribution.device_mesh.devices.size)
    averaged_weights(distribution)
    update_bn(distribution)
    fit(distribution)
    swag_and_fge(distribution)
    np.savez(sys.argv[1], **OUT)


if __name__ == "__main__":
    main()
