"""`--backend`: the Keras 3 backend a benchmark runs on, chosen before Keras is imported.

Keras reads `KERAS_BACKEND` once, when it is first imported, and absl parses the flags only in
`app.run`, after a script's imports have run. So a benchmark script that takes `--backend` calls
`select_from_argv()` at the top, before any import of Keras (or of keras_swa, which imports it):
the flag is read from the command line there and the environment is set to it. The flag always
wins over an inherited `KERAS_BACKEND` (the default run is TensorFlow even under
`KERAS_BACKEND=jax`). `check_loaded` then confirms, in `main`, that Keras runs on the flag's
backend. This module imports neither Keras nor TensorFlow.
"""

import os
import sys

from absl import app
from absl import flags

BACKENDS = ("tensorflow", "jax")

__all__ = ["BACKENDS", "backend_from_argv", "check_loaded", "define_flag", "select_from_argv"]


def backend_from_argv(argv):
    """The value of `--backend` in `argv` (`--backend=X` or `--backend X`; the last one wins).

    Returns `"tensorflow"` when the flag is absent, and the value as written otherwise (absl
    rejects a value outside `BACKENDS` when it parses the flags).
    """
    backend = "tensorflow"
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
        elif arg == "--backend" and i + 1 < len(argv):
            backend = argv[i + 1]
    return backend


def select_from_argv(argv=None):
    """Sets `KERAS_BACKEND` to the `--backend` of `argv` (default `sys.argv[1:]`) if valid."""
    backend = backend_from_argv(sys.argv[1:] if argv is None else argv)
    if backend in BACKENDS:
        os.environ["KERAS_BACKEND"] = backend
    return backend


def define_flag(name):
    """Defines `--backend` for the benchmark `name` (whose JAX run writes `name`_jax.*)."""
    flags.DEFINE_enum(
        "backend",
        "tensorflow",
        list(BACKENDS),
        "The Keras 3 backend to run on (sets KERAS_BACKEND before Keras is imported). The JAX "
        f"run writes {name}_jax.{{json,md,png}}.",
    )


def check_loaded(keras, module):
    """Raises `app.UsageError` unless the imported `keras` runs on `--backend`'s backend."""
    wanted = flags.FLAGS.backend
    if keras.backend.backend() != wanted:
        raise app.UsageError(
            f"`--backend={wanted}` but Keras runs on {keras.backend.backend()!r} "
            f"({keras.__name__} {keras.__version__}). Run the benchmark as a script "
            f"(`python -m benchmarks.{module}`) so that it sets KERAS_BACKEND before Keras is "
            "imported; JAX needs Keras 3 (unset TF_USE_LEGACY_KERAS)."
        )
