"""The keras_swa version, read by pyproject.toml and exposed as `keras_swa.__version__`.

Bump it whenever a saved format changes (see CHANGELOG.md).
"""

__version__ = "0.2.0"

__all__ = ["__version__"]
