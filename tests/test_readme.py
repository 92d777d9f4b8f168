"""Every ```python block of the README runs (with tf_keras swapped in under TF_USE_LEGACY_KERAS)."""

import os
import re
import subprocess
import sys

import pytest

from keras_swa.backend import IS_KERAS_3

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index]
    if not IS_KERAS_3:
        code = re.sub(r"^import keras$", "import tf_keras as keras", code, flags=re.M)
    if "Strategy(" in code:
        # A strategy's collectives stay set up for the whole process: keep them out of ours.
        script = tmp_path / "example.py"
        script.write_text(code)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        if "from keras_swa.backend import keras" not in code:
            env.pop("TF_USE_LEGACY_KERAS", None)  # an example written for Keras 3 itself
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
