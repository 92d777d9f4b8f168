"""A worker process for tests/test_multi_worker.py: SWA under MultiWorkerMirroredStrategy.

Usage (TF_CONFIG set by the test for the two `multi-worker` modes):

    python tests/workers/swa_worker.py MODE OUT_DIR

MODE is one of
  `fit`:          tf_keras (run with TF_USE_LEGACY_KERAS=1) `model.fit` with the `keras_swa.SWA`
                  callback under MultiWorkerMirroredStrategy, exporting a SavedModel;
  `custom`:       a Keras 3 custom training loop with `AveragedWeights` and `update_bn` under
                  MultiWorkerMirroredStrategy;
  `custom-mirrored`: the same loop in one process under MirroredStrategy on two logical CPU
                  devices (the reference the two workers must agree with).
Each process writes `result_<task>.npz` (averages, n_averaged, BN statistics) into OUT_DIR.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 16
NUM_SAMPLES = 64
EPOCHS = 3
LEARNING_RATE = 0.05


def data():
    """The training data every process (and the test's numpy reference) uses."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(NUM_SAMPLES, 4)) * 1.5 + 0.5).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [1.5]]) + 0.3).astype("float32")
    return x, y


def initial_weights(shapes):
    """Fixed initial weights, identical in every process."""
    rng = np.random.default_rng(11)
    return [(rng.normal(size=shape) * 0.3).astype("float32") for shape in shapes]


def task():
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    info = config.get("task", {})
    return f"{info.get('type', 'local')}{info.get('index', 0)}"


def linear_fit_model(keras, strategy):
    """The fit workers' model: Dense(1) on 4 features, the shared initial weights, SGD + MSE."""
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(1)])
        model.set_weights(initial_weights([w.shape for w in model.get_weights()]))
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    return model


def run_fit(out_dir):
    from keras_swa import SWA
    from keras_swa.backend import IS_KERAS_3, keras

    assert not IS_KERAS_3, "the fit worker runs tf_keras (TF_USE_LEGACY_KERAS=1)"
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = data()
    model = linear_fit_model(keras, strategy)
    swa = SWA(start_epoch=1, export_dir=os.path.join(out_dir, "export", "model"), verbose=0)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[swa])
    np.savez(
        os.path.join(out_dir, f"result_{task()}.npz"),
        n_averaged=int(swa.averaged.n_averaged.numpy()),
        weights=np.array([np.asarray(v) for v in model.trainable_variables], dtype=object),
        averages=np.array([np.asarray(a) for a in swa.averaged.averages], dtype=object),
    )


def run_custom(out_dir, strategy):
    from keras_swa import AveragedWeights, update_bn
    from keras_swa.backend import IS_KERAS_3, keras

    assert IS_KERAS_3, "the custom-loop worker runs Keras 3"
    x, y = data()
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, name="d1"),
                keras.layers.BatchNormalization(momentum=0.5, name="bn"),
                keras.layers.Dense(1, name="d2"),
            ]
        )
        model.set_weights(
            [
                w if "moving" in v.path or "gamma" in v.path or "beta" in v.path else w0
                for v, w, w0 in zip(
                    model.weights,
                    model.get_weights(),
                    initial_weights([w.shape for w in model.get_weights()]),
                )
            ]
        )
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        averaged = AveragedWeights(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    # Every worker reads the same global batches; the strategy gives each replica its share.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = strategy.experimental_distribute_dataset(dataset.with_options(options))

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_sample = tf.reduce_sum(tf.square(model(xb, training=True) - yb), axis=1)
                loss = tf.reduce_sum(per_sample) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_step, args=batch)

    for epoch in range(EPOCHS):
        for batch in dataset:
            train_step(batch)
        if epoch >= 1:
            averaged.update()
    averaged.assign_to(model)
    seen = update_bn(model, x, batch_size=GLOBAL_BATCH, verbose=0)
    bn = model.get_layer("bn")
    np.savez(
        os.path.join(out_dir, f"result_{task()}.npz"),
        n_averaged=int(averaged.n_averaged.numpy()),
        seen=seen,
        averages=np.array([np.asarray(a) for a in averaged.averages], dtype=object),
        d1_kernel=np.asarray(model.get_layer("d1").kernel),
        d1_bias=np.asarray(model.get_layer("d1").bias),
        moving_mean=np.array(
            [np.asarray(v) for v in strategy.experimental_local_results(bn.moving_mean.value)]
        ),
        moving_variance=np.array(
            [np.asarray(v) for v in strategy.experimental_local_results(bn.moving_variance.value)]
        ),
    )


def main(mode, out_dir):
    if mode == "fit":
        run_fit(out_dir)
    elif mode == "custom":
        run_custom(out_dir, tf.distribute.MultiWorkerMirroredStrategy())
    elif mode == "custom-mirrored":
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
        run_custom(out_dir, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    else:
        raise ValueError(f"Unknown mode. Received: mode={mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
