"""The public surface: every name in `keras_swa.__all__` imports, and every docstring example runs."""

import doctest
import importlib

import numpy as np
import pytest
import tensorflow as tf

import keras_swa
from keras_swa.backend import keras

PUBLIC = {
    "AveragedWeights",
    "FGE",
    "SWA",
    "SWAG",
    "SwapAveragedWeights",
    "__version__",
    "average_checkpoints",
    "export_saved_model",
    "schedules",
    "update_bn",
}
MODULES = [
    "keras_swa.averaging",
    "keras_swa.averaged_weights",
    "keras_swa.backend",
    "keras_swa.batch_norm",
    "keras_swa.callback",
    "keras_swa.checkpoints",
    "keras_swa.export",
    "keras_swa.schedules",
    "keras_swa.backup",
    "keras_swa.swap",
    "keras_swa.distribution",
    "keras_swa.swag",
    "keras_swa.fge",
    "keras_swa.finite_check",
    "keras_swa.packing",
]


def test_public_names():
    assert set(keras_swa.__all__) == PUBLIC
    for name in keras_swa.__all__:
        assert getattr(keras_swa, name) is not None
    for name in ("Cyclic", "Constant", "Anneal", "PaperSchedule", "Triangular"):
        assert name in keras_swa.schedules.__all__
        assert issubclass(
            getattr(keras_swa.schedules, name), keras.optimizers.schedules.LearningRateSchedule
        )


@pytest.mark.parametrize("module_name", MODULES)
def test_module_has_explicit_all(module_name):
    module = importlib.import_module(module_name)
    assert module.__all__, module_name
    for name in module.__all__:
        assert hasattr(module, name), (module_name, name)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(module_name)
    globs = {"tf": tf, "np": np, "keras": keras, "keras_swa": keras_swa}
    globs.update({name: getattr(module, name) for name in module.__all__})
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name, globs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
