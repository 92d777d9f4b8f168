"""keras_swa on Keras 3's JAX backend with TensorFlow absent, checked with numpy.

A JAX install need not have TensorFlow. Each test runs a script in a fresh process whose first
statement makes `import tensorflow` (and tf_keras) fail exactly as it does where they are not
installed (`sys.modules[name] = None`), then uses keras_swa as a JAX user would and checks the
numbers against numpy. What needs TensorFlow (`export_saved_model` through jax2tf,
`SWA(export_dir=...)`) must raise an `ImportError` that says what to install, and
`SWA(export_dir=...)` must do so at construction, before any training.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.jax_only

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = """
import sys
sys.modules["tensorflow"] = None  # `import tensorflow` now fails as if it were not installed
sys.modules["tf_keras"] = None
import json
import os
import numpy as np
"""


def _run(body, tmp_path):
    """Runs `body` after the prelude with this process's Keras backend; returns its JSON output."""
    env = dict(os.environ)
    if env.get("KERAS_SWA_TEST_INSTALLED") != "1":  # else the installed wheel is under test
        env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    script = tmp_path / "job.py"
    script.write_text(_PRELUDE + textwrap.dedent(body))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
        timeout=300, env=env, cwd=str(tmp_path),
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_module_but_the_tensorflow_backend_imports_without_tensorflow(tmp_path):
    out = _run(
        """
        import importlib, pkgutil
        import keras_swa
        names = sorted(m.name for m in pkgutil.walk_packages(keras_swa.__path__, "keras_swa."))
        imported, refused = [], []
        for name in names:
            try:
                importlib.import_module(name)
                imported.append(name)
            except ImportError:
                refused.append(name)
        print(json.dumps({"imported": imported, "refused": refused,
                          "backend": keras_swa.backend.backend_name()}))
        """,
        tmp_path,
    )
    assert out["backend"] == "jax"
    assert "keras_swa.backends.jax" in out["imported"]
    assert "keras_swa.callback" in out["imported"]
    # Only the TensorFlow backend's own modules need TensorFlow to import.
    assert out["refused"] and all(
        name.startswith("keras_swa.backends.tensorflow") for name in out["refused"]
    ), out["refused"]


def test_averaged_weights_and_update_bn_equal_numpy(tmp_path):
    out = _run(
        """
        import keras_swa
        from keras_swa.backend import keras
        rng = np.random.default_rng(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                  keras.layers.BatchNormalization(momentum=0.5)])
        averaged = keras_swa.AveragedWeights(model)
        snapshots = []
        for _ in range(4):
            values = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
            for v, value in zip(model.trainable_variables, values):
                v.assign(value)
            averaged.update()
            snapshots.append(values)
        last = [np.array(v.numpy()) for v in model.trainable_variables]
        with averaged.swap():
            swapped = [np.array(v.numpy()) for v in model.trainable_variables]
        back = [np.array(v.numpy()) for v in model.trainable_variables]
        averaged.assign_to(model)
        x = rng.normal(size=(50, 3)).astype("float32")
        keras_swa.update_bn(model, x, batch_size=16)
        dense, bn = model.layers
        print(json.dumps({
            "n": int(averaged.n_averaged.numpy()),
            "swapped_error": max(
                float(np.max(np.abs(s - np.mean([snap[i] for snap in snapshots], axis=0))))
                for i, s in enumerate(swapped)),
            "restored_bitwise": all(np.array_equal(a, b) for a, b in zip(last, back)),
            "kernel": np.array(dense.kernel.numpy(), np.float64).tolist(),
            "bias": np.array(dense.bias.numpy(), np.float64).tolist(),
            "x": x.astype(np.float64).tolist(),
            "moving_mean": np.array(bn.moving_mean.numpy(), np.float64).tolist(),
            "moving_variance": np.array(bn.moving_variance.numpy(), np.float64).tolist(),
            "tensorflow": sys.modules["tensorflow"] is None,
        }))
        """,
        tmp_path,
    )
    assert out["n"] == 4
    assert out["swapped_error"] < 1e-6
    assert out["restored_bitwise"]
    # The BN layer's inputs are x @ W + b with the averaged W, b; `update_bn` keeps the
    # batch-size-weighted means of each batch's mean and biased variance (batches 16, 16, 16, 2).
    import numpy as np

    h = np.array(out["x"]) @ np.array(out["kernel"]) + np.array(out["bias"])
    batches = [h[i:i + 16] for i in range(0, len(h), 16)]
    sizes = np.array([len(b) for b in batches], np.float64)
    mean = sizes @ np.array([b.mean(axis=0) for b in batches]) / sizes.sum()
    variance = sizes @ np.array([b.var(axis=0) for b in batches]) / sizes.sum()
    np.testing.assert_allclose(out["moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["moving_variance"], variance, rtol=1e-5, atol=1e-6)
    assert out["tensorflow"], "something replaced the blocked tensorflow module"


def test_swa_fit_with_file_backup_equals_numpy_mean_of_captures(tmp_path):
    out = _run(
        """
        import keras_swa
        from keras_swa.backend import keras
        work = sys.argv[1]
        rng = np.random.default_rng(1)
        x = rng.normal(size=(64, 3)).astype("float32")
        y = x @ np.array([[1.0], [-2.0], [0.5]], "float32")
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")

        class EpochRecorder(keras.callbacks.Callback):
            epochs = {}

            def on_epoch_end(self, epoch, logs=None):
                self.epochs[epoch] = [np.array(v.numpy(), np.float64)
                                          for v in self.model.trainable_variables]

        class BackupLister(keras.callbacks.Callback):
            files = []  # what SWA's file backup holds at the end of each epoch

            def on_epoch_end(self, epoch, logs=None):
                self.files.append(sorted(f for _, _, names in os.walk(work + "/backup")
                                         for f in names))

        swa = keras_swa.SWA(start_epoch=2, swa_lr=0.05, backup_dir=work + "/backup", verbose=0)
        recorder = EpochRecorder()
        model.fit(x, y, epochs=4, batch_size=16, verbose=0, shuffle=False,
                  callbacks=[recorder, swa, BackupLister()])
        epochs = [epoch for epoch, _, _ in swa.captures]
        expected = [np.mean([recorder.epochs[e][i] for e in epochs], axis=0)
                    for i in range(len(model.trainable_variables))]
        error = max(float(np.max(np.abs(np.array(v.numpy(), np.float64) - e)))
                    for v, e in zip(model.trainable_variables, expected))
        try:
            keras_swa.SWA(start_epoch=2, export_dir=work + "/export")
            early = "no error"
        except ImportError as e:
            early = str(e)
        try:
            keras_swa.export_saved_model(model, work + "/export")
            late = "no error"
        except ImportError as e:
            late = str(e)
        print(json.dumps({"epochs": epochs, "error": error, "early": early, "late": late,
                          "backup": BackupLister.files,
                          "export_written": os.path.exists(work + "/export")}))
        """,
        tmp_path,
    )
    assert out["epochs"] == [2, 3]  # 0-based: the SWA phase starts at epoch 2 of 0..3
    assert out["error"] < 1e-6
    for message in (out["early"], out["late"]):
        assert "pip install tensorflow" in message, message
    assert "export_dir=" in out["early"]
    assert not out["export_written"]
    # The crash-safe backup was written during training as `.weights.h5` + JSON files.
    during = out["backup"][-1]
    assert "index.json" in during, out["backup"]
    assert any(name.endswith(".weights.h5") for name in during), out["backup"]


def test_swag_and_fge_round_trip_and_predict(tmp_path):
    out = _run(
        """
        import keras_swa
        from keras_swa.backend import keras
        work = sys.argv[1]
        rng = np.random.default_rng(2)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        snapshots = []
        swag = keras_swa.SWAG(model, max_rank=2)
        fge = keras_swa.FGE(model)
        for _ in range(3):
            values = [rng.normal(size=v.shape).astype("float32") for v in model.weights]
            for v, value in zip(model.weights, values):
                v.assign(value)
            swag.update()
            fge.add()
            snapshots.append(values)
        swag.save_weights(work + "/swag.weights.h5")
        restored = keras_swa.SWAG(model, max_rank=2)
        restored.load_weights(work + "/swag.weights.h5")
        x = rng.normal(size=(5, 3)).astype("float32")
        fge.save_weights(work + "/fge.weights.h5")
        fge2 = keras_swa.FGE(model)
        fge2.load_weights(work + "/fge.weights.h5")
        print(json.dumps({
            "n": int(restored.n_averaged.numpy()),
            "mean": [np.array(m, np.float64).tolist() for m in restored.mean()],
            "snapshots": [[s.astype(np.float64).tolist() for s in snap] for snap in snapshots],
            "x": x.astype(np.float64).tolist(),
            "fge": np.asarray(fge2.predict(x), np.float64).tolist(),
        }))
        """,
        tmp_path,
    )
    import numpy as np

    assert out["n"] == 3
    snapshots = [[np.array(s) for s in snap] for snap in out["snapshots"]]
    for i, mean in enumerate(out["mean"]):
        np.testing.assert_allclose(
            mean, np.mean([snap[i] for snap in snapshots], axis=0), rtol=1e-6, atol=1e-6
        )
    # FGE averages the members' outputs (a linear model's raw outputs here: from_logits=False).
    x = np.array(out["x"])
    expected = np.mean([x @ kernel + bias for kernel, bias in snapshots], axis=0)
    np.testing.assert_allclose(out["fge"], expected, rtol=1e-5, atol=1e-5)
