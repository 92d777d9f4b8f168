"""Tests for `keras_swa.export`: serving without keras_swa, saved_model_cli, atomicity, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_swa.backend import keras
from keras_swa.export import export_saved_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Serves SavedModels in a fresh interpreter that has keras_swa on its path but cannot import it.
_LOADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_without_keras_swa.py")


def _cli():
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    assert os.path.exists(cli), cli
    return cli


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT  # keras_swa *would* be importable: the blocker must stop it.
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _bn_model(train=True):
    """Dense -> BatchNormalization -> ReLU -> Dense on input "features".

    With `train`, two SGD steps move the BN statistics; otherwise they are set at random (cheaper,
    for the tests that only need some model with non-trivial statistics).
    """
    keras.utils.set_random_seed(7)
    inputs = keras.Input((4,), name="features")
    h = keras.layers.Dense(8)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.Activation("relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    rng = np.random.default_rng(0)
    if train:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        x = (rng.normal(size=(32, 4)) * 3 + 2).astype("float32")
        y = rng.normal(size=(32, 3)).astype("float32")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    else:
        _randomize_bn(model.layers[2], rng)
    return model


def _multi_input_model():
    """Two named inputs (a dict), BN trained two steps, two named outputs (a dict)."""
    keras.utils.set_random_seed(8)
    image = keras.Input((5,), name="image")
    meta = keras.Input((2,), name="meta")
    h = keras.layers.Concatenate()([image, meta])
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    outputs = {
        "logits": keras.layers.Dense(3, name="logits")(h),
        "score": keras.layers.Dense(1, activation="sigmoid", name="score")(h),
    }
    model = keras.Model({"image": image, "meta": meta}, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss={"logits": "mse", "score": "mse"}
    )
    rng = np.random.default_rng(1)
    x = {
        "image": (rng.normal(size=(32, 5)) * 2 - 1).astype("float32"),
        "meta": (rng.normal(size=(32, 2)) + 3).astype("float32"),
    }
    y = {
        "logits": rng.normal(size=(32, 3)).astype("float32"),
        "score": rng.uniform(size=(32, 1)).astype("float32"),
    }
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return model


def _randomize_bn(bn, rng):
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights(
        [
            rng.uniform(0.5, 2.0, gamma.shape).astype("float32"),
            rng.normal(size=beta.shape).astype("float32"),
            rng.normal(size=mean.shape).astype("float32"),
            rng.uniform(0.2, 3.0, var.shape).astype("float32"),
        ]
    )


def _layer(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


def _np_batch_norm(h, bn, use_batch_stats=False):
    """Keras' BatchNormalization written out in numpy (inference: the moving statistics)."""
    gamma, beta, moving_mean, moving_var = bn.get_weights()
    mean, var = (h.mean(0), h.var(0)) if use_batch_stats else (moving_mean, moving_var)
    return gamma * (h - mean) / np.sqrt(var + bn.epsilon) + beta


def _np_bn_model(model, x, use_batch_stats=False):
    """The forward pass of `_bn_model` in numpy."""
    (bn,) = _layer(model, keras.layers.BatchNormalization)
    first, last = _layer(model, keras.layers.Dense)
    h = x.astype("float64") @ first.get_weights()[0] + first.get_weights()[1]
    h = np.maximum(_np_batch_norm(h, bn, use_batch_stats), 0.0)
    return h @ last.get_weights()[0] + last.get_weights()[1]


def _np_multi_input_model(model, x):
    """The forward pass of `_multi_input_model` in numpy."""
    (bn,) = _layer(model, keras.layers.BatchNormalization)
    h = np.concatenate([x["image"], x["meta"]], axis=1).astype("float64")
    h = _np_batch_norm(h, bn)
    w, b = model.get_layer("logits").get_weights()
    logits = h @ w + b
    w, b = model.get_layer("score").get_weights()
    return {"logits": logits, "score": 1.0 / (1.0 + np.exp(-(h @ w + b)))}


def _tree_bytes(directory):
    """{relative path: bytes} of every file under `directory`."""
    result = {}
    for root, _, files in os.walk(directory):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                result[os.path.relpath(full, directory)] = fh.read()
    return result


def _serve(path, **inputs):
    outputs = tf.saved_model.load(path).signatures["serving_default"](**inputs)
    return {k: v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports both models, then serves them in a keras_swa-free process and saved_model_cli.

    The two subprocesses run side by side. Returns the models, the inputs and all outputs.
    """
    tmp = tmp_path_factory.mktemp("served")
    bn_model, multi_model = _bn_model(), _multi_input_model()
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(6, 4)) * 3 + 2).astype("float32")
    multi_x = {
        "image": rng.normal(size=(5, 5)).astype("float32"),
        "meta": (rng.normal(size=(5, 2)) + 3).astype("float32"),
    }
    bn_path = export_saved_model(bn_model, str(tmp / "bn_model"))
    multi_path = export_saved_model(multi_model, tmp / "multi_model")
    files = {}
    for name, value in [("features", x), *multi_x.items()]:
        files[name] = str(tmp / f"{name}.npy")
        np.save(files[name], value)
    jobs = [
        {"path": bn_path, "inputs": {"features": files["features"]}, "result": str(tmp / "bn.npz")},
        {
            "path": multi_path,
            "inputs": {"image": files["image"], "meta": files["meta"]},
            "result": str(tmp / "multi.npz"),
        },
    ]
    commands = {
        "loader": [sys.executable, _LOADER, json.dumps(jobs)],
        "saved_model_cli": [
            _cli(), "run", "--dir", multi_path, "--tag_set", "serve",
            "--signature_def", "serving_default",
            "--inputs", f"image={files['image']};meta={files['meta']}",
            "--outdir", str(tmp / "cli_out"),
        ],
    }
    procs = {
        k: subprocess.Popen(c, env=_env(), cwd=str(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
        for k, c in commands.items()
    }
    logs = {k: p.communicate(timeout=180)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, f"{k} failed:\n{logs[k]}"
    assert "LOADER OK" in logs["loader"], logs["loader"]
    return {
        "bn_model": bn_model,
        "multi_model": multi_model,
        "x": x,
        "multi_x": multi_x,
        "loader_bn": dict(np.load(tmp / "bn.npz")),
        "loader_multi": dict(np.load(tmp / "multi.npz")),
        "cli_multi": {k: np.load(tmp / "cli_out" / f"{k}.npy") for k in ("logits", "score")},
    }


# ---------------------------------------------------------------------------------------------
# Serving: a process without keras_swa, and saved_model_cli.


def test_bn_statistics_moved_and_matter(served):
    for model in (served["bn_model"], served["multi_model"]):
        (bn,) = _layer(model, keras.layers.BatchNormalization)
        mean, var = bn.get_weights()[2:]
        assert np.abs(mean).max() > 1e-2 and np.abs(var - 1).max() > 1e-2
    # Inference mode must be what is exported: it differs from batch statistics here.
    model, x = served["bn_model"], served["x"]
    diff = _np_bn_model(model, x) - _np_bn_model(model, x, use_batch_stats=True)
    assert np.abs(diff).max() > 1e-2


def test_loaded_without_keras_swa_matches_model(served):
    model, x = served["bn_model"], served["x"]
    assert set(served["loader_bn"]) == {"output_0"}
    got = served["loader_bn"]["output_0"]
    np.testing.assert_allclose(got, np.asarray(model(x, training=False)), atol=1e-5)
    np.testing.assert_allclose(got, _np_bn_model(model, x), atol=1e-4)


def test_multi_input_loaded_without_keras_swa_matches_model(served):
    model, x = served["multi_model"], served["multi_x"]
    expected, reference = model(x, training=False), _np_multi_input_model(model, x)
    assert set(served["loader_multi"]) == {"logits", "score"}
    for key in ("logits", "score"):
        got = served["loader_multi"][key]
        np.testing.assert_allclose(got, np.asarray(expected[key]), atol=1e-5)
        np.testing.assert_allclose(got, reference[key], atol=1e-4)


def test_saved_model_cli_matches_model(served):
    model, x = served["multi_model"], served["multi_x"]
    expected = model(x, training=False)
    for key in ("logits", "score"):
        np.testing.assert_allclose(served["cli_multi"][key], np.asarray(expected[key]), atol=1e-5)


def test_signature_has_named_inputs_and_dynamic_batch(tmp_path):
    inputs = keras.Input((3,), batch_size=2, name="fixed_batch")  # batch 2 in the model ...
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    path = export_saved_model(model, tmp_path / "m")
    signature = tf.saved_model.load(path).signatures["serving_default"]
    _, kwargs = signature.structured_input_signature
    assert list(kwargs) == ["fixed_batch"]
    assert kwargs["fixed_batch"].shape.as_list() == [None, 3]  # ... any batch when served.
    x = np.arange(15, dtype="float32").reshape(5, 3)
    w, b = model.layers[-1].get_weights()
    np.testing.assert_allclose(signature(fixed_batch=x)["output_0"], x @ w + b, atol=1e-5)


def test_served_batch_size_is_dynamic(tmp_path):
    # On JAX the serving function goes through jax2tf: the batch dimension must stay symbolic
    # there too, so one SavedModel serves two different batch sizes (against numpy).
    model = _bn_model(train=False)
    path = export_saved_model(model, tmp_path / "m")
    signature = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(3)
    for batch in (1, 7):
        x = (rng.normal(size=(batch, 4)) * 3 + 2).astype("float32")
        got = signature(features=x)["output_0"].numpy()
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, _np_bn_model(model, x), atol=1e-4)


@pytest.mark.jax_only
@pytest.mark.parametrize("module", ["tensorflow", "jax.experimental.jax2tf"])
def test_jax_without_tensorflow_says_what_to_install(tmp_path, monkeypatch, module):
    model = _small_model()
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match="pip install tensorflow") as info:
        export_saved_model(model, tmp_path / "model")
    assert repr(module) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_custom_signature_name_also_serving_default(tmp_path):
    model = _bn_model(train=False)
    path = export_saved_model(model, tmp_path / "m", signature_name="predict")
    loaded = tf.saved_model.load(path)
    assert {"predict", "serving_default"} <= set(loaded.signatures)
    x = np.linspace(-2, 2, 8, dtype="float32").reshape(2, 4)
    for name in ("predict", "serving_default"):
        got = loaded.signatures[name](features=x)["output_0"]
        np.testing.assert_allclose(got, _np_bn_model(model, x), atol=1e-4)


def test_subclassed_model_needs_and_uses_input_signature(tmp_path):
    class Scale(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return 2.0 * self.dense(x)

    model = Scale()
    x = np.ones((3, 4), "float32")
    model(x)
    with pytest.raises(ValueError, match="input_signature"):
        export_saved_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    path = export_saved_model(
        model, tmp_path / "m", input_signature=tf.TensorSpec((None, 4), tf.float32, name="x")
    )
    w, b = model.dense.get_weights()
    np.testing.assert_allclose(_serve(path, x=x)["output_0"], 2 * (x @ w + b), atol=1e-5)


def test_creates_missing_parents_and_returns_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _bn_model(train=False)
    path = export_saved_model(model, os.path.join("a", "b", "model"))
    assert path == str(tmp_path / "a" / "b" / "model")
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.listdir(tmp_path / "a" / "b") == ["model"]


# ---------------------------------------------------------------------------------------------
# Overwrite and atomicity.


def _crash_after_partial_write(monkeypatch, exc_type):
    """Makes the SavedModel writer write (part of) a model and then die with `exc_type`."""
    archive_type = type(keras.export.ExportArchive())
    original = archive_type.write_out

    def write_out(self, filepath, *args, **kwargs):
        original(self, filepath, *args, **kwargs)
        # Leave a half-written model: truncate the variables, as a crash mid-write would.
        for name in os.listdir(os.path.join(filepath, "variables")):
            with open(os.path.join(filepath, "variables", name), "wb") as f:
                f.write(b"\0" * 3)
        raise exc_type("simulated crash while writing")

    monkeypatch.setattr(archive_type, "write_out", write_out)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_crash_during_first_export_leaves_nothing(tmp_path, monkeypatch, exc_type):
    model = _bn_model(train=False)
    _crash_after_partial_write(monkeypatch, exc_type)
    with pytest.raises(exc_type, match="simulated crash"):
        export_saved_model(model, tmp_path / "model")
    assert os.listdir(tmp_path) == []  # neither `model` nor a temporary directory


def test_crash_during_overwrite_keeps_old_model(tmp_path, monkeypatch):
    model = _bn_model(train=False)
    path = export_saved_model(model, tmp_path / "model")
    before = _tree_bytes(path)
    x = np.linspace(-2, 2, 12, dtype="float32").reshape(3, 4)
    expected = np.asarray(model(x, training=False))
    model.set_weights([w + 1.0 for w in model.get_weights()])
    _crash_after_partial_write(monkeypatch, RuntimeError)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_saved_model(model, path, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model"]
    assert _tree_bytes(path) == before
    np.testing.assert_allclose(_serve(path, features=x)["output_0"], expected, atol=1e-5)


def test_failed_rename_during_overwrite_restores_old_model(tmp_path, monkeypatch):
    model = _bn_model(train=False)
    path = export_saved_model(model, tmp_path / "model")
    before = _tree_bytes(path)
    real_rename = os.rename

    def rename(src, dst):  # moving the old model away works; moving the new one in fails
        if os.path.basename(src).startswith(".model.tmp-") and dst == path:
            raise OSError("simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated rename failure"):
        export_saved_model(model, path, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model"]
    assert _tree_bytes(path) == before


def test_overwrite_replaces_model(tmp_path):
    model = _bn_model(train=False)
    path = export_saved_model(model, tmp_path / "model")
    model.set_weights([w * 0.5 for w in model.get_weights()])
    assert export_saved_model(model, path, overwrite=True) == path
    assert os.listdir(tmp_path) == ["model"]  # the backup of the old model is gone
    x = np.linspace(-2, 2, 12, dtype="float32").reshape(3, 4)
    np.testing.assert_allclose(
        _serve(path, features=x)["output_0"], _np_bn_model(model, x), atol=1e-4
    )


def test_refuses_to_overwrite_and_leaves_old_model_identical(tmp_path):
    model = _bn_model(train=False)
    path = export_saved_model(model, tmp_path / "model")
    before = _tree_bytes(path)
    model.set_weights([w + 1.0 for w in model.get_weights()])
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        export_saved_model(model, path)
    assert path in str(info.value)
    assert os.listdir(tmp_path) == ["model"]
    assert _tree_bytes(path) == before


# ---------------------------------------------------------------------------------------------
# Errors name the value.


def _small_model():
    inputs = keras.Input((2,), name="x")
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))


def test_path_is_a_file(tmp_path):
    target = tmp_path / "model"
    target.write_text("not a model")
    with pytest.raises(FileExistsError, match="not a directory") as info:
        export_saved_model(_small_model(), target, overwrite=True)
    assert str(target) in str(info.value)
    assert target.read_text() == "not a model"


def test_overwrite_refuses_a_directory_that_is_not_a_saved_model(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(FileExistsError, match="saved_model.pb") as info:
        export_saved_model(_small_model(), target, overwrite=True)
    assert str(target) in str(info.value)
    assert os.listdir(target) == ["holiday.jpg"]


def test_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "sub" / "model"
    with pytest.raises(NotADirectoryError) as info:
        export_saved_model(_small_model(), target)
    assert str(target) in str(info.value) and str(tmp_path / "file") in str(info.value)


def test_parent_not_writable(tmp_path, monkeypatch):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    # root ignores permission bits, so also make the permission check see them.
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode, **kw: False if os.fspath(p) == str(parent) else real_access(p, mode, **kw),
    )
    try:
        with pytest.raises(PermissionError, match="not writable") as info:
            export_saved_model(_small_model(), parent / "model")
        assert str(parent / "model") in str(info.value)
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


def test_model_not_built(tmp_path):
    model = keras.Sequential([keras.layers.Dense(2)], name="unbuilt_net")
    with pytest.raises(ValueError, match="must be built") as info:
        export_saved_model(model, tmp_path / "model")
    assert "unbuilt_net" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"path": "gs://bucket/model"}, ValueError, "path='gs://bucket/model'"),
        ({"path": 42}, TypeError, "path=42"),
        ({"signature_name": "serving default"}, ValueError, "signature_name='serving default'"),
        ({"model": "a model"}, TypeError, "model='a model'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, needle):
    arguments = {"model": _small_model(), "path": tmp_path / "model", **kwargs}
    with pytest.raises(error) as info:
        export_saved_model(**arguments)
    assert needle in str(info.value)
    assert os.listdir(tmp_path) == []
