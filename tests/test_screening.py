"""The accuracy benchmark's screen: validation only, the decision rule, the diagnostics.

The `--quick` screen runs in a subprocess on a Fashion-MNIST folder whose test files are not
readable data at all: if the screen opened them, it would fail. Its JSON is then checked against
the protocol: every configuration present, paired gains equal to the per-seed numbers, capture
counts equal to the paper's rule, and the choice equal to the rule applied independently.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from benchmarks import data as data_lib  # noqa: E402
from benchmarks import screening  # noqa: E402

pytestmark = pytest.mark.tf_only("the benchmark runs on TensorFlow")


def _poisoned_folder(tmp_path):
    folder = tmp_path / "fashion"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(os.path.join(data_lib.FASHION_MNIST_DIR, name), folder / name)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not the test set")
    return folder


def test_loader_reads_only_the_training_files(tmp_path):
    folder = _poisoned_folder(tmp_path)
    ((x, y),) = data_lib.load_fashion_mnist(str(folder), splits=("train",))
    assert x.shape == (60000, 28, 28, 1) and y.shape == (60000,)
    with pytest.raises(Exception):
        data_lib.load_fashion_mnist(str(folder))  # reading the test files fails: poisoned
    cfg = {"dataset": "fashion_mnist", "data_dir": str(folder), "train_size": 100,
           "validation_size": 50, "data_seed": 0}
    data = screening.load_screen_data(cfg, (0.5,), (0.5,))
    order = np.random.RandomState(0).permutation(60000)
    np.testing.assert_array_equal(data["y_train"], y[order[:100]])
    np.testing.assert_array_equal(data["y_val"], y[order[100:150]])
    np.testing.assert_allclose(data["x_val"], (x[order[100:150]] / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_quick_screen_never_reads_the_test_files_and_follows_the_protocol(tmp_path):
    folder = _poisoned_folder(tmp_path)
    out_dir = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy_benchmark", "--mode=screen", "--quick",
         f"--data_dir={folder}", f"--output_dir={out_dir}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out_dir / "accuracy_screen.json").read_text())
    table = (out_dir / "accuracy_screen.md").read_text()
    cfg = result["config"]
    budget, seeds = cfg["budget"], [str(s) for s in range(cfg["seeds"])]
    swa_start = int(round(0.8 * budget))
    steps = -(-cfg["train_size"] // cfg["batch_size"])
    assert result["protocol"]["decision_rule"] == screening.DECISION_RULE
    assert screening.DECISION_RULE in table
    assert [r["augment"] for r in result["regimes"]] == [r["name"] for r in screening.REGIMES]
    assert len(result["configurations"]) == len(screening.REGIMES) * len(screening.SWA_CONFIGS)
    for regime in result["regimes"]:
        best = max(regime["sgd_tuning"], key=lambda t: t["val_accuracy"])
        assert regime["lr_init"] == best["lr_init"]
        gains = [100 * (regime["sgd_1.5B"][s]["val_accuracy"] - regime["sgd"][s]["val_accuracy"])
                 for s in seeds]
        assert np.mean(gains) == pytest.approx(regime["sgd_1.5B_minus_B_points"]["mean"])
        assert regime["saturated"] == (np.mean(gains) <= screening.SATURATION_POINTS)
    by_regime = {r["augment"]: r for r in result["regimes"]}
    for c in result["configurations"]:
        sgd = by_regime[c["augment"]]["sgd"]
        gains = [100 * (c["per_seed"][s]["val_accuracy"] - sgd[s]["val_accuracy"]) for s in seeds]
        assert c["swa_minus_sgd_points"]["values"] == pytest.approx(gains)
        assert c["seeds_positive"] == sum(g > 0 for g in gains)
        # The paper's rule: first capture after swa_start epochs, then per cycle up to B.
        per_epoch = c["captures_per_epoch"]
        cycle = max(1, steps // per_epoch)
        expected = (budget - swa_start + 1) if per_epoch == 1 else \
            ((budget - swa_start + 1) * steps) // cycle
        assert c["captures"] == expected
        assert c["per_seed"][seeds[0]]["snapshot_members"] == budget - swa_start + 1
        assert c["capture_spread"]["mean"] > 0
        assert c["per_seed"][seeds[0]]["final_iterate"]["val_accuracy"] is not None
    # The choice, by the rule applied here independently.
    eligible = [c for c in result["configurations"] if c["regime_saturated"]
                and all(g > 0 for g in c["swa_minus_sgd_points"]["values"])]
    expected = max(eligible, key=lambda c: np.mean(c["swa_minus_sgd_points"]["values"]))["name"] \
        if eligible else None
    assert result["chosen"] == expected

    # The confirmation run of a screened configuration, on the (real) test split.
    name = result["configurations"][0]["name"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy_benchmark", "--mode=confirm", "--quick",
         f"--screen_results={out_dir / 'accuracy_screen.json'}", f"--configuration={name}",
         f"--output_dir={out_dir}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    confirmed = json.loads((out_dir / "accuracy_confirm.json").read_text())
    by_rule = result["chosen"] == name
    assert confirmed["chosen"]["name"] == name and confirmed["chosen"]["chosen_by_rule"] == by_rule
    note = "NOT the screen's rule-based choice" in (out_dir / "accuracy_confirm.md").read_text()
    assert note == (not by_rule)
    marks = {"1": budget, "1.25": round(1.25 * budget), "1.5": round(1.5 * budget)}
    for row in confirmed["rows"]:
        assert row["epochs"] == marks[row["budget"]]
        per_seed = confirmed["per_seed"]
        expected = [100 * (r["swa"][row["budget"]]["swa"] - r["sgd"]["1"]) for r in per_seed]
        assert row["swa_minus_sgd_B_points"]["values"] == pytest.approx(expected)
        expected = [100 * (r["swa"][row["budget"]]["swa"] - r["sgd"][row["budget"]])
                    for r in per_seed]
        assert row["swa_minus_sgd_same_epochs_points"]["values"] == pytest.approx(expected)
        # One capture per epoch (or per cycle) from epoch swa_start on, up to this mark.
        if result["configurations"][0]["captures_per_epoch"] == 1:
            assert row["captures"] == row["epochs"] - swa_start + 1


def test_choose_applies_the_rule():
    def config(name, saturated, values):
        return {"name": name, "regime_saturated": saturated,
                "seeds_positive": sum(v > 0 for v in values),
                "swa_minus_sgd_points": {"mean": float(np.mean(values)), "values": values}}

    configs = [config("small", True, [0.1, 0.2]), config("unsaturated", False, [2.0, 2.0]),
               config("one seed", True, [3.0, -0.1]), config("best", True, [0.5, 0.3])]
    assert screening.choose(configs, 2) == "best"
    assert screening.choose(configs[1:3], 2) is None


def test_capture_spread_matches_numpy():
    diag = screening._Diagnostics.__new__(screening._Diagnostics)
    rng = np.random.RandomState(0)
    diag.captures = [rng.randn(7) for _ in range(4)]
    diag.member_logits = [rng.randn(5, 3) for _ in range(2)]
    diag.data = {"y_val": np.array([0, 1, 2, 0, 1])}
    diag.final_iterate = None
    out = diag.summary()
    w = np.stack(diag.captures)
    mean = w.mean(0)
    expected = np.mean([np.linalg.norm(v - mean) for v in w]) / np.linalg.norm(mean)
    assert out["capture_spread"] == pytest.approx(expected, rel=1e-12)
    probs = [np.exp(l) / np.exp(l).sum(1, keepdims=True) for l in diag.member_logits]
    members = [np.mean(l.argmax(1) == diag.data["y_val"]) for l in diag.member_logits]
    ensemble = np.mean(np.mean(probs, 0).argmax(1) == diag.data["y_val"])
    assert out["snapshot_ensemble_gain_points"] == pytest.approx(100 * (ensemble - np.mean(members)))
