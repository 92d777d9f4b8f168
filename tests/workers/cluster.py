"""What the multi-worker tests share: free local ports and a worker process's environment."""

import json
import os
import socket

__all__ = ["free_ports", "worker_env"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_ports(n):
    """`n` TCP ports on localhost that were free a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(legacy_keras, tf_config=None):
    """This process's environment for a worker: no GPU, keras_swa's root on the path, its
    own Keras version (`TF_USE_LEGACY_KERAS`) and `TF_CONFIG` whatever the caller has."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TF_USE_LEGACY_KERAS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env
