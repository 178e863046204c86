"""Fine-tune the registry's seed MLP in PyTorch for a new task: a five-way head for the digits 0-4.

The ``seed-mlp`` entry was trained to name digits 0-9 on scikit-learn's digits[:1200]. Here it gets a new
five-class head (``num_classes=5``: ``dense2`` is rebuilt and freshly initialised, its checkpoint tensors
reported as replaced) and is fine-tuned on a few labelled images of 0-4 from the held-out digits[1200:];
the rest of the held-out images of 0-4 measure it. ``--freeze`` trains the head only (``freeze="backbone"``).

    python examples/finetune_torch.py                 # a few seconds on 2 CPU cores
    python examples/finetune_torch.py --epochs 30 --train-size 40 --freeze

Prints the accuracy before fine-tuning (the new head is untrained, so this is luck: near chance for most
seeds, though a random head on well-separated features can land higher), after it, and for a random start
trained with the same budget.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

import hubload
from hubload.zoo.torch_models import mlp


def held_out_digits(train_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The 0-4 images of digits[1200:] (never seen by seed-mlp) as features in [0, 1] and labels, split in two."""
    data = load_digits()
    keep = data.target[1200:] < 5
    x = (data.data[1200:][keep] / 16.0).astype(np.float32)
    y = data.target[1200:][keep].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, te = order[:train_size], order[train_size:]
    return torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]), torch.from_numpy(y[te])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct predictions."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    """Full-batch Adam on the trainable parameters (frozen ones have requires_grad False)."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="full-batch training steps")
    parser.add_argument("--train-size", type=int, default=25, help="labelled held-out images to train on")
    parser.add_argument("--freeze", action="store_true", help="train the new head only")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registry", type=Path, help="extra registry YAML (default: the built-in one)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: a temporary one)")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = held_out_digits(args.train_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        model, report = hubload.load("seed-mlp", framework="torch", num_classes=5,
                                     freeze="backbone" if args.freeze else None,
                                     registry=args.registry, cache_dir=args.cache or tmp, return_report=True)
    print(report.summary())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    print(f"trainable: {', '.join(trainable)}; {len(x_train)} training images, {len(x_test)} test images")
    print(f"before fine-tuning: accuracy {accuracy(model, x_test, y_test):.3f}")
    train(model, x_train, y_train, args.epochs, args.lr)
    print(f"after fine-tuning: accuracy {accuracy(model, x_test, y_test):.3f}")

    torch.manual_seed(args.seed)
    scratch = mlp(in_features=64, hidden=64, num_classes=5)
    train(scratch, x_train, y_train, args.epochs, args.lr)
    print(f"random start, same budget: accuracy {accuracy(scratch, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
