#!/usr/bin/env bash
# The main job: SGD vs SWA on Fashion-MNIST, BatchNorm fix, SavedModel export, one prediction
# served from it by a process without keras_swa. Extra arguments go to examples/quickstart.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && \
   [[ " $* " != *" --data_dir"* ]]; then
  apt_install dataset-fashion-mnist
fi
cd "$ROOT"
exec python examples/quickstart.py "$@"
