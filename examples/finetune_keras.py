"""Fine-tune the registry's seed MLP in Keras for a new task: a five-way head for the digits 0-4.

The Keras twin of ``examples/finetune_torch.py``. ``hubload.load("seed-mlp", framework="tf", num_classes=5)``
builds the Keras MLP, loads the PyTorch-published backbone (``dense1``; kernel transposed by the layout
rules) and leaves a fresh five-class head ``dense2`` (reported as replaced). ``--freeze`` sets the loaded
variables ``trainable=False`` (``freeze="backbone"``), so ``model.fit`` trains the head only.

    python examples/finetune_keras.py                 # ~15 s on 2 CPU cores, most of it importing TF
    python examples/finetune_keras.py --steps 50 --freeze

The recipe is full-batch Adam for a fixed number of steps (as in ``finetune_torch.py``): with 25 images,
mini-batches of 16 for a few epochs are only a handful of noisy updates, too few for a fresh head.

Prints the accuracy before fine-tuning, after it, and for a random start trained with the same budget.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import hubload  # noqa: E402
from hubload.zoo.keras_models import mlp  # noqa: E402


def held_out_digits(train_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """The 0-4 images of digits[1200:] (never seen by seed-mlp) as features in [0, 1] and labels, split in two."""
    data = load_digits()
    keep = data.target[1200:] < 5
    x = (data.data[1200:][keep] / 16.0).astype(np.float32)
    y = data.target[1200:][keep].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, te = order[:train_size], order[train_size:]
    return x[tr], y[tr], x[te], y[te]


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Share of correct predictions."""
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))


def train(model: keras.Model, x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> None:
    """Full-batch Adam; variables with trainable=False stay as loaded."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # One epoch of `steps` identical full batches = `steps` full-batch updates, without per-epoch overhead.
    model.fit(np.tile(x, (steps, 1)), np.tile(y, steps), batch_size=len(x), epochs=1, shuffle=False, verbose=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="full-batch training steps")
    parser.add_argument("--train-size", type=int, default=25, help="labelled held-out images to train on")
    parser.add_argument("--freeze", action="store_true", help="train the new head only")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registry", type=Path, help="extra registry YAML (default: the built-in one)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: a temporary one)")
    args = parser.parse_args()

    tf.config.experimental.enable_op_determinism()
    x_train, y_train, x_test, y_test = held_out_digits(args.train_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        keras.utils.set_random_seed(args.seed)
        model, report = hubload.load("seed-mlp", framework="tf", num_classes=5,
                                     freeze="backbone" if args.freeze else None, registry=args.registry,
                                     cache_dir=args.cache or tmp, return_report=True)  # cache: temporary unless given
    print(report.summary())
    trainable = [v.path for v in model.trainable_weights]
    print(f"trainable: {', '.join(trainable)}; {len(x_train)} training images, {len(x_test)} test images")
    print(f"before fine-tuning: accuracy {accuracy(model, x_test, y_test):.3f}")
    train(model, x_train, y_train, args.steps, args.lr)
    print(f"after fine-tuning: accuracy {accuracy(model, x_test, y_test):.3f}")

    keras.utils.set_random_seed(args.seed)
    scratch = mlp(in_features=64, hidden=64, num_classes=5)
    train(scratch, x_train, y_train, args.steps, args.lr)
    print(f"random start, same budget: accuracy {accuracy(scratch, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
