"""The wheel built from this checkout: its metadata, its extras, what it ships, and that it imports.

The wheel is built from a copy of the files `pyproject.toml` packages (so the checkout gets no
`build/` folder), with `pip wheel --no-build-isolation` (offline: setuptools comes from the test
environment, the `test` extra). Expected values come from the sources themselves (the version from
`keras_swa/version.py` read as text, the module list from the folder), not from the build.
"""

import ast
import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "keras_swa")


def _source_version():
    with open(os.path.join(PACKAGE, "version.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "__version__":
            return node.value.value
    raise AssertionError("keras_swa/version.py assigns no __version__")


def _modules():
    """Every .py file under keras_swa/, subpackages included, relative to keras_swa/."""
    found = []
    for folder, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(folder, PACKAGE)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".py")]
    return sorted(name.replace(os.sep, "/") for name in found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    (source / "keras_swa").mkdir()
    for name in _modules() + ["py.typed"]:
        (source / "keras_swa" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(PACKAGE, name), source / "keras_swa" / name)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


def _metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode("utf-8"))


def _requirements(metadata):
    """{extra or None: [requirement without its marker]} from the Requires-Dist lines."""
    out = {}
    for line in metadata.get_all("Requires-Dist"):
        requirement, _, marker = line.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        out.setdefault(extra.group(1) if extra else None, []).append(requirement.strip())
    return out


def _names(requirements):
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def test_wheel_name_and_version(wheel):
    version = _source_version()
    assert wheel.name == f"keras_swa_tf-{version}-py3-none-any.whl"
    metadata = _metadata(wheel)
    assert metadata["Name"] == "keras-swa-tf"
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Requires-Python"].startswith(">=3.")
    assert metadata["Description-Content-Type"] == "text/markdown"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert metadata.get_payload().strip() == f.read().strip()


def test_wheel_ships_the_package_py_typed_and_licence(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    shipped = sorted(n[len("keras_swa/"):] for n in names if n.startswith("keras_swa/"))
    assert shipped == sorted(_modules() + ["py.typed"])
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"keras_swa"}, top  # no tests/, benchmarks/ or examples/ in the wheel


def test_dependencies_and_extras(wheel):
    metadata = _metadata(wheel)
    requirements = _requirements(metadata)
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"tf-keras", "jax", "test", "bench"} <= extras, extras
    runtime = _names(requirements[None])
    assert {"tensorflow", "keras", "numpy"} <= runtime, runtime
    assert "absl-py" not in runtime  # benchmarks and examples only: the `bench` extra
    assert "absl-py" in _names(requirements["bench"])
    assert "tf-keras" in _names(requirements["tf-keras"])
    assert any(r.startswith("jax[cpu]") for r in requirements["jax"]), requirements["jax"]
    # The test extra is what the whole suite imports: both Keras versions and the JAX backend.
    assert {"pytest", "tf-keras", "jax", "scikit-learn"} <= _names(requirements["test"])
    # No upper cap on TensorFlow: no version above the tested one is known to break.
    (tensorflow,) = [r for r in requirements[None] if _names([r]) == {"tensorflow"}]
    assert "<" not in tensorflow, tensorflow


def test_library_never_imports_absl():
    # Why absl-py is not a runtime dependency: no module of the package imports it.
    for name in _modules():
        with open(os.path.join(PACKAGE, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m == "absl" or m.startswith("absl.") for m in modules), (name, modules)


def test_installed_wheel_imports(wheel, tmp_path):
    # Installed on its own (its dependencies come from this environment), away from the checkout.
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    code = (
        "import importlib.resources, keras_swa\n"
        "print(keras_swa.__file__)\n"
        "print(keras_swa.__version__)\n"
        "print(importlib.resources.files('keras_swa').joinpath('py.typed').is_file())\n"
        "print(sorted(keras_swa.__all__) == sorted(n for n in keras_swa.__all__ "
        "if hasattr(keras_swa, n)))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    path, version, typed, complete = done.stdout.split()[-4:]
    assert path.startswith(str(target)), path
    assert version == _source_version()
    assert typed == "True"
    assert complete == "True"


def test_documented_wheel_names_carry_the_version():
    # The install instructions name the wheel file: they must follow a version bump.
    pages = ["README.md"] + [os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                             if n.endswith(".md")]
    version = _source_version()
    for page in pages:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            for named in re.findall(r"keras_swa_tf-([^-\s]+)-py3-none-any\.whl", f.read()):
                assert named == version, f"{page} names the wheel of {named}, not {version}"
