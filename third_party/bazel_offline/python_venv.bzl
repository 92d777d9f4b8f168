"""A Python toolchain for the project's virtual environment, so that py_* targets run in it.

`venv_python_toolchain(name)` creates the repository `@<name>` with a `py_runtime` whose
interpreter is `$KERAS_SWA_VENV/bin/python` (default: `<workspace>/.venv/bin/python`, the venv
that scripts/setup_env.sh makes), and a `:toolchain` to pass to `register_toolchains`. The venv
holds TensorFlow, Keras and pytest; Bazel itself installs nothing. Changing KERAS_SWA_VENV
re-creates the repository.
"""

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    visibility = ["//visibility:public"],
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
    visibility = ["//visibility:public"],
)
"""

def _venv_python_toolchain_impl(rctx):
    workspace = str(rctx.path(Label("//:WORKSPACE")).dirname)
    venv = rctx.os.environ.get("KERAS_SWA_VENV", "") or ".venv"
    if not venv.startswith("/"):
        venv = workspace + "/" + venv
    python = venv + "/bin/python"
    if not rctx.path(python).exists:
        fail((
            "keras_swa's Bazel build runs Python from a virtual environment, but {python} does " +
            "not exist. Create it with `bash scripts/setup_env.sh` (scripts/bazel_test.sh does " +
            "that too), or point KERAS_SWA_VENV at a venv with keras_swa's dependencies."
        ).format(python = python))
    rctx.file("WORKSPACE", 'workspace(name = "{}")\n'.format(rctx.name))
    rctx.file("BUILD.bazel", _BUILD.format(python = python))

venv_python_toolchain = repository_rule(
    implementation = _venv_python_toolchain_impl,
    environ = ["KERAS_SWA_VENV"],
    local = True,
)
