"""The hubload demo: the headline call on the embedded, offline `seed-mlp` entry.

    hubload.load("seed-mlp", framework="tf")      # a Keras model
    hubload.load("seed-mlp", framework="torch")   # the PyTorch twin, same weights

The weights ship inside hubload (a relative `file` source in the built-in registry), so this runs with no
network: the file is verified against its sha256 once, copied into the cache, and later runs are cache hits.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's C++ banners (oneDNN, cpu_feature_guard)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("HUBLOAD_OFFLINE", "1")  # prove it: nothing here may touch the network

import numpy as np  # noqa: E402

import hubload  # noqa: E402


def main() -> None:
    entry = hubload.load_registry().get("seed-mlp")
    print(f"entry: {entry.id} — {entry.description}")
    paths = hubload.pull("seed-mlp")
    print(f"pulled (sha256 verified): {paths['model.safetensors']}")

    try:  # absl's Python logging (TF's "absl::InitializeLog" preamble) stays quiet too
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    keras_model, report = hubload.load("seed-mlp", framework="tf", return_report=True)
    print(f"\nhubload.load('seed-mlp', framework='tf') -> {type(keras_model).__name__}")
    print(report.render())
    torch_model = hubload.load("seed-mlp", framework="torch")
    print(f"hubload.load('seed-mlp', framework='torch') -> {type(torch_model).__name__}")

    try:
        from sklearn.datasets import load_digits
    except ImportError:  # the demo still shows agreement without the dataset
        x = np.random.default_rng(0).random((256, 64), dtype=np.float32)
        y = None
    else:
        digits = load_digits()
        x = (digits.data[1200:] / 16.0).astype(np.float32)  # the examples the seed model never trained on
        y = digits.target[1200:]

    import torch

    tf_logits = np.asarray(keras_model(x))
    with torch.no_grad():
        pt_logits = torch_model(torch.from_numpy(x)).numpy()
    print(f"\nmax |keras - torch| logits on {len(x)} inputs: {np.abs(tf_logits - pt_logits).max():.2e}")
    if y is not None:
        print(f"held-out digits accuracy: keras {np.mean(tf_logits.argmax(1) == y):.3f}, "
              f"torch {np.mean(pt_logits.argmax(1) == y):.3f}")


if __name__ == "__main__":
    main()
