"""Every ```python block of README.md and docs/*.md runs (tf_keras swapped in under TF_USE_LEGACY_KERAS).

A block runs as written, in a fresh namespace and an empty working directory; its own `assert`s
and the errors it raises are what fail the test. Blocks whose first line reads
`# TensorFlow only: <why>` run only on the TensorFlow backend; every other block runs on JAX too. Blocks that build a `tf.distribute` strategy run
in a subprocess, since a strategy's collectives stay set up for the whole process; so do blocks
that choose their own Keras backend (`os.environ["KERAS_BACKEND"] = ...`), which only a fresh
process can.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

from keras_swa.backend import IS_KERAS_3, backend_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(
    os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)


def _python_blocks(document):
    with open(os.path.join(ROOT, document), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


_BLOCKS = [
    (document, index, code)
    for document in DOCUMENTS
    for index, code in enumerate(_python_blocks(document))
]


def test_readme_has_examples():
    assert len(_python_blocks("README.md")) >= 2  # the fit example and the custom loop


def test_relative_links_resolve():
    # Every relative link of README.md and docs/*.md names a file of the checkout, and every
    # docs page is reachable from the README.
    linked = set()
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(document), target))
            assert os.path.exists(path), f"{document} links to {target!r}, which does not exist"
            if document == "README.md":
                linked.add(os.path.relpath(path, ROOT))
    pages = [d for d in DOCUMENTS if d.startswith("docs" + os.sep)]
    assert pages, "docs/ has no pages"
    assert not set(pages) - linked, f"docs pages the README does not link: {set(pages) - linked}"


def test_every_python_fence_is_collected():
    # A ```python fence the pattern above missed (say, indented) would never run: count them.
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding="utf-8") as f:
            fences = sum(1 for line in f if line.strip() == "```python")
        assert fences == len(_python_blocks(document)), document


@pytest.mark.parametrize(
    "document,index,code", _BLOCKS, ids=[f"{d}[{i}]" for d, i, _ in _BLOCKS]
)
def test_example_runs(document, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first_line = code.splitlines()[0]
    if first_line.startswith("# TensorFlow only:") and backend_name() != "tensorflow":
        # The block shows a TensorFlow API (tf.function, tf.distribute, tf.train.Checkpoint),
        # and says so in its first line: it has no meaning on another Keras backend.
        pytest.skip(first_line[2:])
    own_backend = 'os.environ["KERAS_BACKEND"]' in code  # written for a Keras 3 backend
    if not IS_KERAS_3 and not own_backend:
        code = re.sub(r"^import keras$", "import tf_keras as keras", code, flags=re.M)
    if "Strategy(" in code or own_backend:
        script = tmp_path / "example.py"
        script.write_text(code)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        if "from keras_swa.backend import keras" not in code:
            env.pop("TF_USE_LEGACY_KERAS", None)  # an example written for Keras 3 itself
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    exec(compile(code, f"{document}[python block {index}]", "exec"), {"__name__": "__doc_example__"})
