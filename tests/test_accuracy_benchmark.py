"""Tests for the accuracy benchmark: its data loaders on tiny fake files, and a `--quick` run.

The loaders are checked on IDX `.gz` files and CIFAR pickle batches written here with hand-made
contents (the expected arrays are built independently, pixel by pixel). The `--quick` run executes
the whole pipeline in a subprocess exactly as documented and checks the JSON, markdown and PNG
outputs, their keys and the internal consistency of the numbers (not the result: the numbers of a
quick run mean nothing).
"""

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

import keras_swa

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from benchmarks import data as data_lib  # noqa: E402
from benchmarks import metrics as metrics_lib  # noqa: E402
from benchmarks import models as models_lib  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ Fashion-MNIST


def _write_idx_gz(path, array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion_mnist(folder, n_train=5, n_test=3):
    images = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            x[i, i, 2 * i] = 10 + i  # one distinctive pixel per image
            x[i, 27, 27] = 200 - i
        y = np.arange(n, dtype=np.uint8) % 10
        _write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
        images[split] = (x, y)
    return images


def test_fashion_mnist_loader_reads_idx_gz_files(tmp_path):
    _fake_fashion_mnist(tmp_path)
    (x_train, y_train), (x_test, y_test) = data_lib.load_fashion_mnist(str(tmp_path))
    assert x_train.shape == (5, 28, 28, 1) and x_train.dtype == np.uint8
    assert x_test.shape == (3, 28, 28, 1)
    assert y_train.dtype == np.int64
    assert y_train.tolist() == [0, 1, 2, 3, 4] and y_test.tolist() == [0, 1, 2]
    for i in range(5):
        assert x_train[i, i, 2 * i, 0] == 10 + i
        assert x_train[i, 27, 27, 0] == 200 - i
        # Nothing else is set: the header was not read as pixels.
        assert int(x_train[i].astype(np.int64).sum()) == (10 + i) + (200 - i)
    assert data_lib.load_dataset("fashion_mnist", str(tmp_path))[1][0].shape == (3, 28, 28, 1)


def test_fashion_mnist_missing_file_names_it_and_how_to_install(tmp_path):
    _fake_fashion_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as info:
        data_lib.load_fashion_mnist(str(tmp_path))
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert f"data_dir={str(tmp_path)!r}" in message


def test_idx_reader_rejects_bad_headers_and_truncated_data(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + b"\0" * 8)  # float32 type
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        data_lib.read_idx_gz(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"\1\2")
    with pytest.raises(ValueError, match=r"declares shape \(5,\)"):
        data_lib.read_idx_gz(str(short))


# ------------------------------------------------------------------------------------- CIFAR


def _cifar_images(n, offset):
    """Images (N, 32, 32, 3) whose pixel (r, c, ch) encodes (image, channel, position)."""
    x = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        for ch in range(3):
            x[i, :, :, ch] = (offset + 7 * i + 50 * ch) % 256
        x[i, 0, 1, 2] = 255  # an asymmetric pixel: catches a wrong transpose
    return x


def _write_cifar_batch(path, x, labels, label_key):
    # The standard layout: each row is 1024 red, then 1024 green, then 1024 blue values.
    rows = np.stack([x[i].transpose(2, 0, 1).reshape(-1) for i in range(len(x))])
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, label_key: list(labels), b"batch_label": b"fake"}, f)


def test_cifar10_loader_reads_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected_x, expected_y = [], []
    for b in range(1, 6):
        x, y = _cifar_images(2, 10 * b), [b % 10, (b + 3) % 10]
        _write_cifar_batch(folder / f"data_batch_{b}", x, y, b"labels")
        expected_x.append(x)
        expected_y += y
    x_test, y_test = _cifar_images(3, 99), [9, 8, 7]
    _write_cifar_batch(folder / "test_batch", x_test, y_test, b"labels")

    for data_dir in (tmp_path, folder):  # the parent folder or the batches folder itself
        (xt, yt), (xs, ys) = data_lib.load_cifar("cifar10", str(data_dir))
        assert xt.shape == (10, 32, 32, 3) and xt.dtype == np.uint8
        np.testing.assert_array_equal(xt, np.concatenate(expected_x))
        assert yt.tolist() == expected_y and yt.dtype == np.int64
        np.testing.assert_array_equal(xs, x_test)
        assert ys.tolist() == y_test
        assert xt[0, 0, 1, 2] == 255 and xt[0, 1, 0, 2] != 255


def test_cifar100_loader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = _cifar_images(4, 1)
    rows = np.stack([x[i].transpose(2, 0, 1).reshape(-1) for i in range(4)])
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": rows, b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [1] * 4}, f)
    _write_cifar_batch(folder / "test", x[:2], [5, 6], b"fine_labels")
    (xt, yt), (xs, ys) = data_lib.load_dataset("cifar100", str(tmp_path))
    np.testing.assert_array_equal(xt, x)
    assert yt.tolist() == [99, 0, 42, 7] and ys.tolist() == [5, 6]


def test_cifar_missing_files_say_what_and_how(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar_batch(folder / "data_batch_1", _cifar_images(1, 0), [1], b"labels")
    with pytest.raises(FileNotFoundError) as info:
        data_lib.load_cifar("cifar10", str(tmp_path))
    message = str(info.value)
    assert "test_batch" in message and "data_batch_5" in message
    assert "data_batch_1'" not in message  # present files are not reported missing
    assert "cifar-10-python.tar.gz" in message and "never downloads" in message
    with pytest.raises(ValueError, match="needs `--data_dir`"):
        data_lib.load_cifar("cifar100", None)
    with pytest.raises(ValueError, match="Received: dataset='mnist'"):
        data_lib.load_dataset("mnist")


def test_standardize_matches_the_formula():
    x = np.array([[0, 255], [51, 102]], np.uint8)
    out = data_lib.standardize(x, 0.5, 0.25)
    expected = (np.array([[0.0, 1.0], [0.2, 0.4]]) - 0.5) / 0.25
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32


# ------------------------------------------------------------------------------------ models


def test_models_have_batch_norm_and_the_documented_size():
    model = models_lib.build_model("preresnet", (28, 28, 1), 10, width=32)
    # Independent count for width 32, one block per stage (no biases in the convs).
    w = 32
    stem = 9 * 1 * w
    stage1 = 2 * 9 * w * w + 2 * 2 * w
    stage2 = 9 * w * 2 * w + 9 * 2 * w * 2 * w + w * 2 * w + 2 * w + 2 * 2 * w
    stage3 = 9 * 2 * w * 4 * w + 9 * 4 * w * 4 * w + 2 * w * 4 * w + 2 * 2 * w + 2 * 4 * w
    head = 2 * 4 * w + 4 * w * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + head
    count = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert count == expected == 307_690 and 250_000 < count < 350_000
    assert len(keras_swa.backend.batch_norm_layers(model)) == 7
    vgg = models_lib.build_model("vgg", (32, 32, 3), 100, width=8)
    assert len(keras_swa.backend.batch_norm_layers(vgg)) == 6
    assert vgg.output_shape == (None, 100)
    with pytest.raises(ValueError, match="Received: model='resnet'"):
        models_lib.build_model("resnet", (8, 8, 1), 2)


def test_cnn_size_weight_decay_scope_and_bn_momentum():
    w = 16
    model = models_lib.build_model("cnn", (28, 28, 1), 10, width=w, bn_momentum=0.9)
    # Independent count: five conv3x3 without bias, each with BN (gamma, beta), dense head.
    convs = [(1, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)]
    expected = sum(9 * a * b + 2 * b for a, b in convs) + 4 * w * 10 + 10
    count = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert count == expected == 70_330
    bns = keras_swa.backend.batch_norm_layers(model)
    assert len(bns) == 5 and all(layer.momentum == 0.9 for layer in bns)
    x = np.ones((2, 28, 28, 1), np.float32)
    for scope, n_penalties in (("kernels", 6), ("all", 6 + 2 * 5 + 1)):
        m = models_lib.build_model("cnn", (28, 28, 1), 10, width=2, weight_decay=1e-2,
                                   weight_decay_scope=scope)
        m(x)
        assert len(m.losses) == n_penalties
        # The penalty is l2(wd / 2): its gradient is wd * w, torch's weight_decay.
        total = sum(float(np.sum(np.square(v.numpy()))) for v in m.trainable_weights
                    if scope == "all" or "kernel" in v.path)
        assert float(sum(float(l) for l in m.losses)) == pytest.approx(0.5e-2 * total, rel=1e-4)
    with pytest.raises(ValueError, match="Received: weight_decay_scope='bias'"):
        models_lib.build_model("cnn", (28, 28, 1), 10, weight_decay_scope="bias")


def test_crop_flip_keeps_shape_and_pixels_shifted():
    import tensorflow as tf

    x = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1) + 1.0
    out, labels = models_lib.augment_crop_flip(tf.constant(x), tf.constant([3, 4]), pad=2)
    out = out.numpy()
    assert out.shape == x.shape and labels.numpy().tolist() == [3, 4]
    for i in range(2):
        nonzero = out[i][out[i] != 0]
        # Every surviving pixel comes from the same image; padding brings only zeros.
        assert set(nonzero.tolist()) <= set(x[i].ravel().tolist())
        assert len(nonzero) >= 6 * 6
    # Each output is the padded image cropped at some offset, flipped or not (checked here
    # against every candidate, independently of how the batch version draws them).
    out, _ = models_lib.augment_crop_flip(tf.constant(x), None, pad=2, seed=[0, 9])
    padded = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
    for i in range(2):
        candidates = [c for dy in range(5) for dx in range(5)
                      for c in (padded[i, dy:dy + 8, dx:dx + 8], padded[i, dy:dy + 8, dx:dx + 8][:, ::-1])]
        assert any(np.array_equal(out[i].numpy(), c) for c in candidates)


# ------------------------------------------------------------------------------ metrics


def test_probability_metrics_match_a_hand_computation():
    probabilities = np.array([[0.9, 0.1], [0.65, 0.35], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    out = metrics_lib.probability_metrics(probabilities, labels, bins=15)
    assert out["accuracy"] == pytest.approx(0.75)
    nll = -(np.log(0.9) + np.log(0.35) + np.log(0.7) + np.log(0.55)) / 4
    assert out["nll"] == pytest.approx(nll)
    # 15 bins of width 1/15. Confidences 0.9 (bin (13/15, 14/15], right), 0.65 (bin (9/15,
    # 10/15], wrong), 0.7 (bin (10/15, 11/15], right), 0.55 (bin (8/15, 9/15], right): every
    # bin holds one prediction, so ECE = mean |correct - confidence|.
    ece = (abs(1 - 0.9) + abs(0 - 0.65) + abs(1 - 0.7) + abs(1 - 0.55)) / 4
    assert out["ece"] == pytest.approx(ece)
    # Two predictions in one bin: ECE uses the bin's mean accuracy and mean confidence.
    out = metrics_lib.probability_metrics(np.array([[0.62, 0.38], [0.64, 0.36]]), [0, 1], bins=15)
    assert out["ece"] == pytest.approx(abs(0.5 - 0.63))


def test_softmax_matches_the_formula():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]])
    expected = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    out = metrics_lib.softmax(logits)
    np.testing.assert_allclose(out[0], expected, rtol=1e-12)
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.0], atol=1e-12)


# ------------------------------------------------------------------------------ --quick run


def test_quick_run_writes_json_table_and_plot(tmp_path):
    package_root = tmp_path / "package_root"
    package_root.mkdir()
    (package_root / "benchmarks").symlink_to(os.path.join(REPO_ROOT, "benchmarks"))
    keras_swa_parent = os.path.dirname(os.path.dirname(os.path.abspath(keras_swa.__file__)))
    python_path = [keras_swa_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(python_path),
    )
    output_dir = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.accuracy_benchmark",
            "--quick",
            "--output_dir",
            str(output_dir),
        ],
        cwd=package_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # about 60 s alone; a hang guard for a busy shared machine
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Progress lines: epoch, elapsed and ETA.
    assert "[seed 0] SGD epoch 1/4" in proc.stdout and "ETA" in proc.stdout
    assert "[seed 1] SWA epoch 6/6" in proc.stdout

    paths = {ext: output_dir / f"accuracy_benchmark.{ext}" for ext in ("json", "md", "png")}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC

    payload = json.loads(paths["json"].read_text())
    for key in ("command", "date", "machine", "versions", "config", "rows", "per_seed", "notes"):
        assert key in payload, key
    assert payload["command"].startswith("python -m benchmarks.accuracy_benchmark --quick")
    config = payload["config"]
    assert config["quick"] is True and config["seeds"] == 2
    assert config["budget"] == 4 and config["swa_start_epoch"] == 3
    assert config["marks"] == {"1": 4, "1.25": 5, "1.5": 6}
    assert payload["eval_split"] == "test" and payload["num_train"] == 256

    rows = {row["key"]: row for row in payload["rows"]}
    assert list(rows) == [
        "sgd", "swa_1", "swa_1.25", "swa_1.5", "swa_no_bn", "ema", "ema_bn", "swa_run_iterate",
        "swag", "fge",
    ]
    per_seed = payload["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1]
    for key, row in rows.items():
        values = [r[key]["eval_accuracy"] for r in per_seed]
        assert all(0.0 <= v <= 1.0 for v in values)
        # mean and sample std recomputed here with numpy.
        assert row["eval_accuracy"]["mean"] == pytest.approx(np.mean(values))
        assert row["eval_accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))
        sgd = [r["sgd"]["eval_accuracy"] for r in per_seed]
        assert row["minus_sgd_points"]["mean"] == pytest.approx(
            100 * (np.mean(values) - np.mean(sgd))
        )
    for r in per_seed:
        assert len(r["sgd_curve"]) == 4 and len(r["swa_run_iterate_curve"]) == 6
        assert r["sgd_curve"][-1] == r["sgd"]["eval_accuracy"]
        assert r["swa_run_iterate_curve"][-1] == r["swa_run_iterate"]["eval_accuracy"]
        # One capture per epoch from epoch 3 (0-based) on: epochs 4, 5, 6 -> 1, 2, 3 captures.
        assert [r[f"swa_{k}"]["n_averaged"] for k in ("1", "1.25", "1.5")] == [1, 2, 3]
        assert r["swa_captures"] == 3 and r["swa_no_bn"]["n_averaged"] == 1
        assert sorted(r["swa_curve"], key=int) == ["4", "5", "6"]
        assert r["swa_curve"]["5"] == r["swa_1.25"]["eval_accuracy"]
        # The SWA callback's final model (averages + update_bn in the trained model) is the
        # copy evaluated at budget 1.5.
        assert r["swa_callback_final_eval_accuracy"] == pytest.approx(
            r["swa_1.5"]["eval_accuracy"], abs=1.5 / 256
        )
        assert 0.0 <= r["sgd"]["train_accuracy"] <= 1.0
        # SWAG and FGE saw the same single capture by budget 1. SWAG's variance of one capture
        # is 0, so every draw is the SWA average and its BN-recomputed prediction is SWA's;
        # FGE's one member is the iterate with its own BN statistics, i.e. the no-BN ablation.
        assert r["swag"]["n_captures"] == 1 and r["swag"]["rank"] == 1
        assert r["swag"]["low_rank"] is False and r["fge"]["members"] == 1
        assert r["swag"]["eval_accuracy"] == pytest.approx(r["swa_1"]["eval_accuracy"], abs=1e-9)
        assert r["fge"]["eval_accuracy"] == pytest.approx(
            r["swa_no_bn"]["eval_accuracy"], abs=1e-9
        )
        for key in ("sgd", "swa_1", "swag", "fge"):
            assert r[key]["nll"] > 0 and 0.0 <= r[key]["ece"] <= 1.0
        assert r["swag"]["nll"] == pytest.approx(r["swa_1"]["nll"], rel=1e-4)
        assert r["swag"]["predict_cost_ratio"] > 1.0  # two draws, each with a BN pass

    table = paths["md"].read_text()
    assert "| method | budget | epochs | Test accuracy (%) |" in table
    assert "Train accuracy (%)" in table
    for method in ("SWA without BN recompute", "Keras use_ema EMA", "EMA + update_bn"):
        assert method in table
    assert table.split("### Uncertainty")[0].count("\n| SWA | ") == 3
    assert "Budget 1.25 (5 epochs): SWA" in table
    assert len(payload["verdicts"]) == 3
    assert "### Uncertainty and cost at budget 1" in table
    assert "| NLL (nats) | ECE (%, 15 bins) |" in table


def test_bad_flags_are_rejected_with_the_value(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy_benchmark", "--quick", "--budget", "3",
         "--output_dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Received: budget=3" in proc.stdout + proc.stderr
