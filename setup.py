"""Packaging for keras_swa (distribution name `keras-swa-tf`; import name `keras_swa`).

PyPI's `keras-swa` is an unrelated 2021 project (import name `swa`) that does not run on Keras 3,
hence the distinct distribution name.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _version():
    scope = {}
    exec(_read(os.path.join("keras_swa", "version.py")), scope)
    return scope["__version__"]


setup(
    name="keras-swa-tf",
    version=_version(),
    description=(
        "Stochastic Weight Averaging for Keras 3 and TensorFlow: a fit callback, a custom-loop "
        "API, SWA schedules, exact BatchNorm recompute and SavedModel export."
    ),
    long_description=_read("README.md") if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["keras_swa", "keras_swa.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.23",
        "keras>=3.3,<4",
        "absl-py>=1.0",
        "numpy>=1.23",
    ],
    extras_require={
        "tf_keras": ["tf-keras>=2.16,<2.23"],
        "test": ["pytest>=7", "pytest-timeout>=2", "scikit-learn>=1.1", "tf-keras>=2.16,<2.23"],
        "bench": ["matplotlib>=3.5", "scikit-learn>=1.1"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Intended Audience :: Science/Research",
    ],
)
