"""Smoke tests for the cost benchmarks in `benchmarks/`: each runs `--quick` and writes results.

The benchmarks run in subprocesses exactly as documented (`python -m benchmarks.NAME --quick`),
against the same keras_swa this test imports (the installed wheel in CI); the shared helpers are
checked in-process against hand-computed numbers.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
from absl import app

import keras_swa

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: an installed keras_swa keeps precedence over the source tree.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from benchmarks import backend_flag  # noqa: E402
from benchmarks import flags as bench  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_benchmark(module, tmp_path, *args, keras_backend=None):
    # `python -m` puts the working directory first on sys.path, so the benchmark runs from a
    # folder that holds only the `benchmarks` package, and finds keras_swa where this test did.
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
    if keras_backend is not None:
        env["KERAS_BACKEND"] = keras_backend
    output_dir = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--output_dir", str(output_dir), *args],
        cwd=package_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return output_dir


def _check_files(output_dir, name, module=None, timed=True):
    """Checks NAME.{json,md,png}; `module` is the script that wrote them (default: `name`).

    `timed`: the results are a list of rows with `timings_s` (not the memory benchmark's).
    """
    paths = {ext: output_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0, path
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    table = paths["md"].read_text()
    assert "| variant |" in table and "| --- |" in table
    payload = json.loads(paths["json"].read_text())
    for key in ("benchmark", "command", "date", "machine", "versions", "config", "results"):
        assert key in payload, key
    assert payload["benchmark"] == name
    assert payload["command"].startswith(f"python -m benchmarks.{module or name} --quick")
    assert payload["machine"]["cpu_count"] == os.cpu_count()
    for key in ("tensorflow", "keras", "keras_flavour", "numpy", "python"):
        assert payload["versions"][key], key
    # The benchmark ran the keras_swa this test imports (the installed wheel in CI).
    assert payload["versions"]["keras_swa_path"] == os.path.dirname(
        os.path.abspath(keras_swa.__file__)
    )
    assert payload["config"]["quick"] is True
    for result in payload["results"] if timed else ():
        assert result["timings_s"], result["name"]
        assert all(t > 0 for t in result["timings_s"]), result["name"]
    return payload, table


def test_averaging_benchmark_quick(tmp_path):
    output_dir = _run_benchmark("benchmarks.averaging_benchmark", tmp_path, "--repeats", "2")
    payload, table = _check_files(output_dir, "averaging_benchmark")
    results = {r["name"]: r for r in payload["results"]}
    product = "keras_swa AveragedWeights.update()"
    floor = "floor: one flat jit lerp (TF/XLA)"
    naive = "naive per-variable tf.function loop"
    no_check = 'keras_swa AveragedWeights(nonfinite="ignore").update()'
    for name in (product, no_check, floor, naive):
        assert name in results and name in table
        assert len(results[name]["timings_s"]) == 2  # --repeats 2
        assert results[name]["median_ms"] > 0 and results[name]["ratio_to_floor"] > 0
    assert results[floor]["ratio_to_floor"] == 1.0
    config = payload["config"]
    assert config["num_tensors"] == 24  # the default --quick_num_tensors
    assert 0 < config["num_floats"] < 25_583_592  # a strict subset of ResNet-50's floats
    targets = {t["name"]: t for t in payload["targets"]}
    for label in ("product", 'product with nonfinite="ignore"'):
        assert targets[f"{label} within 1.2x of the floor"]["met"] in (True, False)
    torch_row = "torch get_swa_multi_avg_fn (foreach lerp)"
    if importlib.util.find_spec("torch") is not None:
        assert results[torch_row]["median_ms"] > 0
        assert payload["versions"]["torch"]
    else:
        assert torch_row not in results
        assert any(note.startswith("torch rows skipped") for note in payload["notes"])
        assert "skipped" in table


def test_averaging_benchmark_quick_with_mirrored_replicas(tmp_path):
    output_dir = _run_benchmark(
        "benchmarks.averaging_benchmark",
        tmp_path,
        "--repeats",
        "2",
        "--num_replicas=2",
        "--notorch",
        "--quick_num_tensors=4",
    )
    payload, table = _check_files(output_dir, "averaging_benchmark")
    results = {r["name"]: r for r in payload["results"]}
    pairs = {
        "MirroredStrategy 2 replicas: AveragedWeights.update()": (
            "keras_swa AveragedWeights.update()"
        ),
        'MirroredStrategy 2 replicas: AveragedWeights(nonfinite="ignore").update()': (
            'keras_swa AveragedWeights(nonfinite="ignore").update()'
        ),
    }
    assert "| x single device |" in table
    for mirrored, single in pairs.items():
        assert mirrored in table and single in results
        row = results[mirrored]
        assert len(row["timings_s"]) == 2 and row["replicas"] == 2
        assert row["single_device_variant"] == single
        assert row["per_replica_ms"] == row["median_ms"]  # concurrent replicas: as measured
        # The ratio is the median of per-round ratios to the single-device row of the same run.
        per_round = sorted(
            a / b for a, b in zip(row["timings_s"], results[single]["timings_s"])
        )
        assert row["ratio_to_single_device"] == pytest.approx(sum(per_round) / 2)
    assert payload["config"]["num_replicas"] == 2
    assert payload["config"]["replica_devices"] == ["/cpu:0", "/cpu:1"]
    assert payload["config"]["num_tensors"] == 4
    assert any("MirroredStrategy rows" in note for note in payload["notes"])


def test_averaging_benchmark_quick_on_jax(tmp_path):
    # `--backend=jax` sets KERAS_BACKEND before Keras is imported, even when the environment
    # says otherwise, and writes its own files next to (not over) the TensorFlow run's.
    output_dir = _run_benchmark(
        "benchmarks.averaging_benchmark",
        tmp_path,
        "--backend=jax",
        "--repeats",
        "2",
        "--quick_num_tensors=4",
    )
    payload, table = _check_files(output_dir, "averaging_benchmark_jax", "averaging_benchmark")
    assert not (output_dir / "averaging_benchmark.json").exists()
    assert payload["benchmark"] == "averaging_benchmark_jax"
    assert payload["config"]["backend"] == "jax" and payload["versions"]["jax"]
    assert payload["config"]["num_tensors"] == 4
    results = {r["name"]: r for r in payload["results"]}
    floor = "floor: one flat jit lerp (JAX/XLA, donated)"
    product = "keras_swa AveragedWeights.update()"
    no_check = 'keras_swa AveragedWeights(nonfinite="ignore").update()'
    for name in (product, no_check, floor):
        assert name in results and name in table
        assert len(results[name]["timings_s"]) == 2
        assert results[name]["median_ms"] > 0
    assert results[floor]["ratio_to_floor"] == 1.0
    assert "naive per-variable tf.function loop" not in results
    targets = {t["name"]: t for t in payload["targets"]}
    parts = "product within 5% of its two passes timed apart (floor + the NaN/Inf test alone)"
    assert set(targets) == {
        "product within 1.5x of the floor",
        'product with nonfinite="ignore" within 1.2x of the floor',
        'product with nonfinite="ignore" no slower than torch foreach',
        parts,
    }
    assert targets["product within 1.5x of the floor"]["met"] in (True, False)
    # The checked update against its two passes: the median over rounds of
    # product / (floor + NaN/Inf test alone), from the recorded timings.
    check = "NaN/Inf fast test alone: its float32 sums (JAX/XLA, reference)"
    per_round = [
        p / (f + c)
        for p, f, c in zip(
            results[product]["timings_s"], results[floor]["timings_s"],
            results[check]["timings_s"],
        )
    ]
    assert targets[parts]["value"] == pytest.approx(sum(per_round) / 2)
    assert targets[parts]["met"] == (targets[parts]["value"] <= 1.05)


def test_averaging_benchmark_refuses_mirrored_replicas_on_jax(tmp_path):
    with pytest.raises(AssertionError, match="runs on TensorFlow only"):
        _run_benchmark(
            "benchmarks.averaging_benchmark", tmp_path, "--backend=jax", "--num_replicas=2"
        )


def test_multi_worker_benchmark_quick(tmp_path):
    start = time.perf_counter()
    output_dir = _run_benchmark("benchmarks.multi_worker_benchmark", tmp_path)
    assert time.perf_counter() - start < 60
    payload, table = _check_files(output_dir, "multi_worker_benchmark")
    plain = "plain fit (2 workers)"
    swa = "SWA, capture every epoch, bn_data (2 workers)"
    results = {r["name"]: r for r in payload["results"]}
    assert set(results) == {plain, swa}
    config = payload["config"]
    assert config["num_workers"] == 2 and config["num_replicas_in_sync"] == 2
    assert (config["repeats"], config["warmup"]) == (1, 0)
    # The workers always train with tf_keras, whichever Keras this test runs.
    assert payload["versions"]["keras_flavour"] == "tf_keras (Keras 2)"
    for name in (plain, swa):
        row = results[name]
        assert name in table
        # One measured round; each fit's first epoch is not timed.
        assert len(row["timings_s"]) == config["epochs_per_fit"] - 1
        # One round: the ratio is the ratio of the two fits' median epoch times.
        expected = statistics.median(row["timings_s"]) / statistics.median(
            results[plain]["timings_s"]
        )
        assert row["ratio_to_plain_epoch"] == pytest.approx(expected)
        assert len(row["train_end_s"]) == 1 and len(row["per_worker_epoch_median_s"]) == 2
    assert results[plain]["ratio_to_plain_epoch"] == 1.0
    # SWA's on_train_end writes the averages and runs the BN pass over bn_data: it takes time.
    assert results[swa]["train_end_median_s"] > results[plain]["train_end_median_s"]
    assert len(payload["workers"]) == 2
    assert "End of training" in table


def _check_fit_overhead(payload, table):
    """The fit overhead benchmark's rows and targets, on whichever backend it ran."""
    results = {r["name"]: r for r in payload["results"]}
    assert set(results) == {
        "plain fit",
        "SWA, capture every epoch",
        "SWA, capture every step",
        "update_bn(model, x), one pass",
    }
    config = payload["config"]
    for name in ("plain fit", "SWA, capture every epoch", "SWA, capture every step"):
        # One measured round; each fit's first epoch is not timed.
        assert len(results[name]["timings_s"]) == config["epochs_per_fit"] - 1
        assert results[name]["ratio_to_plain_epoch"] > 0
    assert results["plain fit"]["ratio_to_plain_epoch"] == 1.0
    plain = statistics.median(results["plain fit"]["timings_s"])
    targets = {t["name"]: t for t in payload["targets"]}
    for name in ("SWA, capture every epoch", "SWA, capture every step"):
        # SWA's on_train_end writes the averages and runs the BN pass: it takes time.
        assert results[name]["train_end_median_s"] > 0
        # Time inside SWA's own hooks, measured per epoch (the first epoch is dropped).
        assert len(results[name]["swa_hooks_s"]) == config["epochs_per_fit"] - 1
        assert results[name]["swa_hooks_median_s"] > 0
        # One round: by hook time, a plain epoch plus the median hook time, over a plain epoch.
        by_hooks = targets[name + " by hook time"]
        expected = 1 + statistics.median(results[name]["swa_hooks_s"]) / plain
        assert by_hooks["value"] == pytest.approx(expected)
        assert by_hooks["met"] == (by_hooks["value"] <= by_hooks["target"])
        assert by_hooks["target"] == targets[name]["target"]
    assert "swa_hooks_s" not in results["plain fit"]
    assert len(results["update_bn(model, x), one pass"]["timings_s"]) == 1
    assert {t["target"] for t in payload["targets"]} == {1.01, 1.05, 0.5}
    assert "End of training" in table and "inside the SWA callback's own hooks" in table
    assert "| x plain epoch by hook time |" in table


def test_fit_overhead_benchmark_quick(tmp_path):
    output_dir = _run_benchmark("benchmarks.fit_overhead_benchmark", tmp_path)
    payload, table = _check_files(output_dir, "fit_overhead_benchmark")
    _check_fit_overhead(payload, table)
    assert "tf_intra_op_threads" in payload["config"]


def test_fit_overhead_benchmark_quick_on_jax(tmp_path):
    start = time.perf_counter()
    output_dir = _run_benchmark(
        "benchmarks.fit_overhead_benchmark", tmp_path, "--backend=jax", keras_backend="jax"
    )
    assert time.perf_counter() - start < 60
    payload, table = _check_files(
        output_dir, "fit_overhead_benchmark_jax", "fit_overhead_benchmark"
    )
    assert not (output_dir / "fit_overhead_benchmark.json").exists()
    assert payload["config"]["backend"] == "jax" and payload["versions"]["jax"]
    assert "JAX" in table
    _check_fit_overhead(payload, table)


def test_memory_benchmark_quick_on_jax(tmp_path):
    start = time.perf_counter()
    output_dir = _run_benchmark(
        "benchmarks.memory_benchmark", tmp_path, "--backend=jax", keras_backend="jax"
    )
    assert time.perf_counter() - start < 60
    payload, table = _check_files(
        output_dir, "memory_benchmark_jax", "memory_benchmark", timed=False
    )
    assert not (output_dir / "memory_benchmark.json").exists()
    config = payload["config"]
    assert config["backend"] == "jax" and payload["versions"]["jax"]
    assert config["num_params"] == 4_000_000  # --quick
    param_bytes = 4 * config["num_params"]
    assert payload["param_bytes"] == param_bytes
    targets = {t["name"]: t for t in payload["targets"]}
    for variant in ("raise", "ignore"):
        result = payload["results"][variant]
        probe = result["bytes"]
        # The state is one fp32 average per weight plus the count (int32 without x64).
        assert probe["state_bytes"] == {
            "averages": param_bytes,
            "count": 4,
            "num_averages": 8,  # 4M parameters in tensors of 500k
        }
        state = targets[f"averaging state bytes (averages + count), nonfinite={variant!r}"]
        assert state["value"] == (param_bytes + 4) / param_bytes and state["met"] is True
        # The live arrays: the weights, then one more copy of them (the averages and count).
        live = result["in_param_copies"]["averages_created"]["live_arrays_over_weights"]
        assert live == pytest.approx(1.0, abs=1e-3)
        # XLA writes the new averages into the donated ones.
        assert probe["compiled_update"]["alias_size_in_bytes"] >= param_bytes
        for stage in ("averages_created", "later_updates"):
            target = targets[f"peak over weights, {stage.replace('_', ' ')}, nonfinite={variant!r}"]
            assert target["value"] == result["in_param_copies"][stage]["extra_over_weights"]
    if not payload["results"]["raise"]["bytes"]["device_memory_stats_available"]:
        assert config["memory_source"] == "process RSS"
        assert "memory_stats()` is None on cpu" in table
    for line in ("- averaging state, nonfinite='raise':", "- compiled update program",
                 "- XLA runtime kept after the first update", "| live jax.Arrays over weights |"):
        assert line in table, line


@pytest.mark.parametrize(
    "argv, backend",
    [
        ([], "tensorflow"),
        (["--backend=jax"], "jax"),
        (["--quick", "--backend", "jax"], "jax"),
        (["--backend=jax", "--backend=tensorflow"], "tensorflow"),  # the last one wins
        (["--", "--backend=jax"], "tensorflow"),  # not a flag after `--`
    ],
)
def test_backend_flag_is_read_from_the_command_line(argv, backend, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert backend_flag.select_from_argv(argv) == backend
    assert os.environ["KERAS_BACKEND"] == backend


def test_cost_benchmark_collects_every_parts_targets(tmp_path):
    parts = ["averaging_benchmark", "memory_benchmark"]
    output_dir = _run_benchmark(
        "benchmarks.cost_benchmark", tmp_path, "--parts", ",".join(parts), "--repeats", "2"
    )
    payload = json.loads((output_dir / "cost_benchmark.json").read_text())
    assert payload["config"] == {"quick": True, "parts": parts}
    table = (output_dir / "cost_benchmark.md").read_text()
    expected = []
    for name in parts:
        part = json.loads((output_dir / "cost_parts" / f"{name}.json").read_text())
        assert part["command"].startswith(f"python -m benchmarks.{name}")
        assert "--quick" in part["command"]
        assert part["targets"], name
        for target in part["targets"]:
            expected.append((target["name"], target.get("value"), target.get("target"),
                             target.get("met")))
            assert f"| {name.replace('_benchmark', '')} | {target['name']} |" in table
        if name == "memory_benchmark":
            # Each memory target is the stage's measured peak over the weights.
            copies = {k: v["in_param_copies"] for k, v in part["results"].items()}
            for target in part["targets"]:
                variant = "raise" if "'raise'" in target["name"] else "ignore"
                stage = ("averages_created" if "averages created" in target["name"]
                         else "later_updates")
                assert target["value"] == copies[variant][stage]["extra_over_weights"]
                assert target["met"] == (target["value"] <= part["target"])
    # Every target of every part, as the part wrote it.
    assert [(t["name"], t["value"], t["target"], t["met"]) for t in payload["targets"]] == expected
    for target in payload["targets"]:
        if target["value"] is not None:
            assert target["value_over_target"] == pytest.approx(
                target["value"] / target["target"]
            )
    met = sum(t[3] is True for t in expected)
    assert f"{met} of {len(expected)} targets met" in table
    assert (output_dir / "cost_benchmark.png").read_bytes()[:8] == PNG_MAGIC


def test_cost_benchmark_rejects_an_unknown_part(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cost_benchmark", "--parts", "speed",
         "--output_dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Received: parts=['speed']" in proc.stdout + proc.stderr


def test_interleave_rotates_the_first_variant_and_drops_warmup():
    calls = []
    variants = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    out = bench.interleave(variants, repeats=2, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # Measurements of rounds 2 and 3 only (the call counter at each call).
    assert out == {"a": [6, 8], "b": [4, 9], "c": [5, 7]}


def test_summary_and_paired_ratio_statistics():
    stats = bench.summarize([4.0, 1.0, 3.0, 2.0])
    assert stats["median"] == 2.5
    assert (stats["min"], stats["max"], stats["count"]) == (1.0, 4.0, 4)
    assert (stats["p25"], stats["p75"]) == (1.75, 3.25)
    # Per-round ratios 2, 1 and 4: the median is 2, unlike the ratio of medians (4 / 2).
    assert bench.paired_ratio([2.0, 4.0, 4.0], [1.0, 4.0, 1.0]) == 2.0
    with pytest.raises(ValueError, match="as many numerators"):
        bench.paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats=0"], "Received: repeats=0"),
        (["--warmup=-1"], "Received: warmup=-1"),
        (["--output_dir="], "Received: output_dir=''"),
    ],
)
def test_bad_flags_are_rejected_with_the_value(argv, message):
    bench.FLAGS(["benchmark"] + argv)
    try:
        with pytest.raises(app.UsageError, match=message):
            bench.validate_common_flags()
    finally:
        bench.FLAGS.unparse_flags()
