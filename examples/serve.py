"""Serves one prediction from an exported SavedModel, without keras_swa (or Keras) imported.

Run as its own process: `python examples/serve.py --model_dir out/swa_savedmodel --input x.npy`.
It refuses to import keras_swa (to prove the SavedModel stands alone), loads the model with
`tf.saved_model.load`, calls its `serving_default` signature and prints the prediction as JSON.
"""

import argparse
import importlib.abc
import json
import sys


class _BlockKerasSwa(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "keras_swa" or name.startswith("keras_swa."):
            raise ImportError(f"{name} is blocked: the SavedModel must serve without it")
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--input", required=True, help=".npy file with a batch of inputs")
    args = parser.parse_args(argv)

    sys.meta_path.insert(0, _BlockKerasSwa())
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(args.model_dir)
    serve = loaded.signatures["serving_default"]
    x = np.load(args.input)
    outputs = serve(tf.constant(x))
    probabilities = next(iter(outputs.values())).numpy()
    print(
        json.dumps(
            {
                "keras_swa_importable": "keras_swa" in sys.modules,
                "predicted_class": probabilities.argmax(axis=-1).tolist(),
                "probabilities": np.round(probabilities, 6).tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
