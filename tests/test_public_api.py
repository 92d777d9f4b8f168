"""The public surface, checked by behaviour rather than against a hand copy of `__all__`.

Every name in `keras_swa.__all__` imports, is public and documented (a docstring, a row in
README.md's "Public API" table); every public module declares an `__all__` whose names exist;
and every docstring example runs with nothing but its module's own globals, as a reader who
copies it would run it.
"""

import doctest
import importlib
import os
import pkgutil
import re

import pytest

import keras_swa

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _public_modules():
    names = []
    for info in pkgutil.walk_packages(keras_swa.__path__, prefix="keras_swa."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


MODULES = _public_modules()


def _import(module_name):
    """Imports a module; skips one that needs an optional dependency not installed here."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("keras_swa"):
            pytest.skip(f"{module_name} needs {e.name}, which is not installed")
        raise


def _readme_public_api_names():
    text = open(README, encoding="utf-8").read()
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `keras_swa\.(\w+)`", section, flags=re.MULTILINE))


def test_modules_are_found():
    # The discovery above must see the package's modules, or the tests below check nothing.
    assert {"keras_swa.callback", "keras_swa.backends.tensorflow_backup", "keras_swa.schedules"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(keras_swa.__all__))
def test_public_name_imports_and_is_documented(name):
    assert not name.startswith("_") or name == "__version__", name
    namespace = {}
    exec(f"from keras_swa import {name}", namespace)  # noqa: S102  (the import a user writes)
    value = namespace[name]
    assert value is getattr(keras_swa, name)
    if name == "__version__":
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", value), value
    else:
        doc = getattr(value, "__doc__", None)
        assert doc and doc.strip(), f"keras_swa.{name} has no docstring"
    assert name in _readme_public_api_names(), (
        f"keras_swa.{name} is missing from README.md's Public API table"
    )


def test_readme_lists_only_public_names():
    assert _readme_public_api_names() <= set(keras_swa.__all__)


def test_every_public_name_is_in_all():
    # A name imported into the package namespace without a leading underscore, other than
    # its modules, is meant to be public: it must be listed.
    modules = {info.name for info in pkgutil.iter_modules(keras_swa.__path__)}
    exposed = {
        name
        for name, value in vars(keras_swa).items()
        if not name.startswith("_") and (name not in modules or name in keras_swa.__all__)
    }
    assert exposed <= set(keras_swa.__all__), exposed - set(keras_swa.__all__)


@pytest.mark.parametrize("module_name", MODULES)
def test_module_has_explicit_all(module_name):
    module = _import(module_name)
    assert "__all__" in vars(module), f"{module_name} declares no __all__"
    for name in module.__all__:
        assert hasattr(module, name), (module_name, name)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = _import(module_name)
    # globs=None: each example sees a copy of its module's globals and nothing injected.
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
