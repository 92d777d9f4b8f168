"""The keras_swa version, read by setup.py and exposed as `keras_swa.__version__`."""

__version__ = "0.1.0"
