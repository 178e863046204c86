"""Train the seed MLP (Dense 64 relu -> Dense 10) on scikit-learn's digits and write the demo weights.

This is how ``hubload/data/seed-mlp/model.safetensors`` (the built-in ``seed-mlp`` entry) was made:

    python examples/train_seed_mlp.py --out hubload/data/seed-mlp/model.safetensors

Inputs are the 8x8 digit images flattened to 64 features and scaled to [0, 1] (pixel / 16).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from hubload.zoo.torch_models import mlp


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Features in [0, 1] and labels of the 1797 digits."""
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = digits()
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    model = mlp(in_features=64, hidden=64, num_classes=10).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[1200:])).argmax(1).numpy() == y[1200:]).mean()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out),
              metadata={"format": "pt", "trained_on": "sklearn digits[:1200]"})
    data = args.out.read_bytes()
    print(f"held-out accuracy {acc:.3f}; wrote {args.out} size {len(data)} sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
