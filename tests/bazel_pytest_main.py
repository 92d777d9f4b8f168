"""Runs one pytest file as a Bazel `py_test` (see BUILD.bazel): `bazel_pytest_main.py FILE [ARGS]`.

Bazel's runfiles are read-only, so pytest's cache is off; temporary files go to the test's
`TEST_TMPDIR` and results to Bazel's `XML_OUTPUT_FILE`. Extra arguments (`--test_arg=-k ...`)
are passed on to pytest.
"""

import importlib.util
import os
import sys

import pytest


def _check_keras_swa_from_runfiles():
    """Fails if `keras_swa` would be imported from outside this test's runfiles.

    The project's venv has keras_swa installed in editable mode, which would silently stand in
    for a missing `deps = [":keras_swa"]`; this makes that mistake an error.
    """
    runfiles = os.environ.get("TEST_SRCDIR")
    if not runfiles:  # not under `bazel test`
        return
    spec = importlib.util.find_spec("keras_swa")
    origin = spec.origin if spec else None
    if not origin or not os.path.abspath(origin).startswith(os.path.abspath(runfiles) + os.sep):
        sys.exit(f"keras_swa resolves to {origin}, not to Bazel's runfiles in {runfiles}: "
                 "does the py_test depend on //:keras_swa?")


def main(argv):
    if not argv:
        sys.exit("usage: bazel_pytest_main.py TEST_FILE [PYTEST_ARGS...]")
    _check_keras_swa_from_runfiles()
    args = [argv[0], "-p", "no:cacheprovider", *argv[1:]]
    if os.environ.get("TEST_TMPDIR"):
        args.append("--basetemp=" + os.path.join(os.environ["TEST_TMPDIR"], "pytest"))
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
