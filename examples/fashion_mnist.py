"""Loads Fashion-MNIST from Debian's `dataset-fashion-mnist` package (no download at run time).

`apt-get install dataset-fashion-mnist` puts the four IDX files under
/usr/share/datasets/fashion-mnist/; this module reads them with gzip + numpy.
"""

import gzip
import os

import numpy as np

__all__ = ["DEFAULT_DIR", "load_fashion_mnist"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_fashion_mnist(data_dir=DEFAULT_DIR):
    """Returns `(x_train, y_train), (x_test, y_test)`: uint8 images (N, 28, 28), int labels.

    Raises:
        FileNotFoundError: with the command that installs the data set, if it is missing.
    """
    out = []
    for split in ("train", "test"):
        image_file, label_file = (os.path.join(data_dir, f) for f in _FILES[split])
        for path in (image_file, label_file):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"Fashion-MNIST file {path!r} is missing. Install Debian's data set with "
                    "`sudo apt-get install dataset-fashion-mnist` (it installs to "
                    f"{DEFAULT_DIR}), or pass the folder that holds the four IDX .gz files. "
                    f"Received: data_dir={data_dir!r}"
                )
        with gzip.open(image_file, "rb") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(label_file, "rb") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        out.append((images, labels))
    return tuple(out)
