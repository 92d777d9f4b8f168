"""Offline image classification data for the accuracy benchmark: Fashion-MNIST and CIFAR-10/100.

Nothing is downloaded. Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (four
IDX `.gz` files under /usr/share/datasets/fashion-mnist); CIFAR-10 and CIFAR-100 come from a
local folder holding the standard python-pickle batches of
https://www.cs.toronto.edu/~kriz/cifar.html (`cifar-10-batches-py/` with `data_batch_1` ..
`data_batch_5` and `test_batch`; `cifar-100-python/` with `train` and `test`). A missing file
raises a `FileNotFoundError` that names it and says how to get it.

Every loader returns `(x_train, y_train), (x_test, y_test)`: uint8 images `(N, H, W, C)` and
int64 labels `(N,)`.
"""

import gzip
import os
import pickle

import numpy as np

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "read_idx_gz",
    "standardize",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist", "cifar10", "cifar100")

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "num_classes": 100,
    },
}


def read_idx_gz(path):
    """Reads one gzipped IDX file (the MNIST format) into a numpy array.

    The header is parsed rather than assumed: two zero bytes, a type code (0x08 = uint8), the
    number of dimensions, then one big-endian uint32 per dimension.

    Args:
        path: the `.gz` file.

    Returns:
        A uint8 array of the shape the header declares.

    Raises:
        ValueError: if the header is not that of a uint8 IDX file or the data is truncated.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(
            f"{path!r} is not a uint8 IDX file (expected the magic bytes 00 00 08 ..). "
            f"Received: first bytes {raw[:4]!r}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(
            f"{path!r} declares shape {shape} ({size} bytes) but holds {len(raw) - header} "
            "bytes of data."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(data_dir=None, splits=("train", "test")):
    """Loads Fashion-MNIST from the four IDX `.gz` files of Debian's `dataset-fashion-mnist`.

    Args:
        data_dir: the folder holding the files. Defaults to `None`
            (/usr/share/datasets/fashion-mnist).
        splits: which splits to read, in order. `("train",)` never opens the test files (the
            benchmark's screening mode, which must not see the test set). Defaults to both.

    Returns:
        One `(x, y)` pair per split, by default `(x_train, y_train), (x_test, y_test)`:
        uint8 `(N, 28, 28, 1)` images, int64 labels.

    Raises:
        FileNotFoundError: naming the missing file and the command that installs it.
    """
    data_dir = data_dir or FASHION_MNIST_DIR
    out = []
    for split in splits:
        if split not in _FASHION_FILES:
            raise ValueError(f"`splits` holds 'train' and/or 'test'. Received: splits={splits!r}")
        paths = [os.path.join(data_dir, name) for name in _FASHION_FILES[split]]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Fashion-MNIST file {path!r} is missing. Install Debian's data set with "
                    "`sudo apt-get install dataset-fashion-mnist` (it installs the four IDX .gz "
                    f"files into {FASHION_MNIST_DIR}), or pass `--data_dir` pointing to a folder "
                    f"that holds {sorted(n for v in _FASHION_FILES.values() for n in v)}. "
                    f"Received: data_dir={data_dir!r}"
                )
        images = read_idx_gz(paths[0])
        labels = read_idx_gz(paths[1]).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} files do not match: images {images.shape}, labels "
                f"{labels.shape}. Received: data_dir={data_dir!r}"
            )
        out.append((images[..., None], labels))
    return tuple(out)


def _cifar_folder(data_dir, spec):
    """`data_dir` itself if it holds the batches, else its `cifar-*-py*` subfolder."""
    candidates = [data_dir, os.path.join(data_dir, spec["folder"])]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, n)) for n in spec["train"] + spec["test"]):
            return folder
    missing = [
        os.path.join(candidates[1], n)
        for n in spec["train"] + spec["test"]
        if not os.path.isfile(os.path.join(candidates[1], n))
        and not os.path.isfile(os.path.join(data_dir, n))
    ]
    raise FileNotFoundError(
        f"CIFAR files are missing: {missing}. This benchmark never downloads data: get "
        f"{spec['archive']} (the python version) from https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"unpack it with `tar xzf {spec['archive']}` and pass `--data_dir` pointing to the folder "
        f"that contains {spec['folder']}/ (or to {spec['folder']}/ itself). "
        f"Received: data_dir={data_dir!r}"
    )


def _read_cifar_batch(path, label_key):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch[label_key], np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{path!r}: {len(images)} images but {len(labels)} labels.")
    return images, labels


def load_cifar(name, data_dir):
    """Loads CIFAR-10 or CIFAR-100 from the standard python-pickle batches in a local folder.

    Args:
        name: `"cifar10"` or `"cifar100"` (fine labels).
        data_dir: the folder holding `cifar-10-batches-py/` or `cifar-100-python/`, or that
            folder itself.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: uint8 `(N, 32, 32, 3)` images, int64 labels.

    Raises:
        ValueError: if `name` is not a CIFAR data set or `data_dir` is not given.
        FileNotFoundError: naming the missing files and how to get them.
    """
    if name not in _CIFAR:
        raise ValueError(f"`name` must be one of {sorted(_CIFAR)}. Received: name={name!r}")
    spec = _CIFAR[name]
    if not data_dir:
        raise ValueError(
            f"{name} needs `--data_dir`: the folder that holds {spec['folder']}/ (unpacked from "
            f"{spec['archive']}, https://www.cs.toronto.edu/~kriz/cifar.html; this benchmark "
            f"never downloads data). Received: data_dir={data_dir!r}"
        )
    folder = _cifar_folder(data_dir, spec)
    out = []
    for split in ("train", "test"):
        parts = [
            _read_cifar_batch(os.path.join(folder, n), spec["label_key"]) for n in spec[split]
        ]
        out.append(
            (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        )
    return tuple(out)


def load_dataset(name, data_dir=None):
    """Loads one of `DATASETS` (see `load_fashion_mnist` and `load_cifar`)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir)
    if name in _CIFAR:
        return load_cifar(name, data_dir)
    raise ValueError(f"`dataset` must be one of {DATASETS}. Received: dataset={name!r}")


def standardize(x, mean, std):
    """`(x / 255 - mean) / std` as float32 (per channel when `mean`/`std` are sequences)."""
    x = x.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
