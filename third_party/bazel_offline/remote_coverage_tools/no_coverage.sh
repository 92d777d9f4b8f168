#!/bin/sh
# Offline stand-in: `bazel coverage` is not supported in this workspace (no coverage tools).
echo "keras_swa's offline Bazel set-up has no coverage tools; use 'bazel test', not 'bazel coverage'." >&2
exit 1
