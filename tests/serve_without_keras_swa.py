"""Serves SavedModels in a Python process where keras_swa cannot be imported.

Used by the export tests (tests/test_export.py, tests/test_fge.py): run as
`python tests/serve_without_keras_swa.py JOBS`, where JOBS is a JSON list of
`{"path": saved_model_dir, "inputs": {name: .npy file}, "result": .npz file}`. keras_swa is
blocked from import (and may well be on the path: the block must stop it), each SavedModel's
`serving_default` signature is called with the inputs, and its outputs are saved to `result`.
Prints "LOADER OK" on success.
"""

import importlib.abc
import json
import sys


class _BlockKerasSwa(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "keras_swa" or name.startswith("keras_swa."):
            raise ImportError("blocked by the test: " + name)
        return None


def main(jobs):
    sys.meta_path.insert(0, _BlockKerasSwa())
    try:
        import keras_swa  # noqa: F401
    except ImportError as e:
        assert "blocked by the test" in str(e), e
    else:
        sys.exit("keras_swa could be imported")

    import numpy as np
    import tensorflow as tf

    for job in jobs:
        serve = tf.saved_model.load(job["path"]).signatures["serving_default"]
        feeds = {name: tf.constant(np.load(f)) for name, f in job["inputs"].items()}
        outputs = serve(**feeds)
        np.savez(job["result"], **{k: v.numpy() for k, v in outputs.items()})
    assert not any(m.split(".")[0] == "keras_swa" for m in sys.modules)
    print("LOADER OK")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
