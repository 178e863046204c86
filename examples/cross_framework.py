"""Train in PyTorch, publish as a registry entry, fine-tune in Keras: the pretrained start beats a random one.

1. PyTorch: train the seed MLP (64 -> hidden relu -> 10) to name digits on scikit-learn's digits[:1200].
2. Publish: write its weights as safetensors and a registry YAML whose entry has a local ``file`` source,
   the file's sha256 and size, the classification head (``head: [dense2.*]``) and both architectures.
3. Keras: ``hubload.load("my-digits-mlp", framework="tf", num_classes=5, registry=...)`` verifies the file
   into the cache, builds the Keras twin with a new five-class head and loads the PyTorch-trained backbone.
4. Fine-tune it for a new task, a five-way head for digits 0-4, on 25 labelled held-out images, and
   compare with the same Keras model started from random weights, trained with the same budget (same
   data, epochs, optimiser, seed). The backbone's features transfer; the random start has to learn them.

    python examples/cross_framework.py                  # ~20 s on 2 CPU cores, most of it importing TF
    python examples/cross_framework.py --quick

Everything is written to temporary folders unless ``--registry``/``--cache`` name them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

import hubload
from hubload.adapters import zoo_torch

ENTRY = "my-digits-mlp"


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as features in [0, 1] and labels 0-9."""
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def pretrain_torch(x: np.ndarray, y: np.ndarray, hidden: int, steps: int, seed: int) -> torch.nn.Module:
    """Step 1: full-batch Adam on the 10-class task."""
    torch.manual_seed(seed)
    model = zoo_torch.mlp(in_features=x.shape[1], hidden=hidden, num_classes=10).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def publish(model: torch.nn.Module, folder: Path, hidden: int) -> Path:
    """Step 2: weights + a registry YAML next to them; returns the YAML's path."""
    weights = folder / "weights" / "model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    data = weights.read_bytes()
    registry = folder / "registry.yaml"
    registry.write_text(f"""version: 1
models:
  {ENTRY}:
    source: {weights.parent}
    files:
      - {{path: model.safetensors, sha256: {hashlib.sha256(data).hexdigest()}, size: {len(data)}}}
    format: safetensors
    layout: torch
    head: ["dense2.*"]
    architecture: {{torch: "hubload.adapters.zoo_torch:mlp", tf: "hubload.adapters.zoo_keras:mlp"}}
    config: {{in_features: 64, hidden: {hidden}, num_classes: 10}}
    description: Seed MLP trained on digits[:1200] in PyTorch by examples/cross_framework.py
""")
    return registry


def finetune_keras(model, x, y, x_test, y_test, epochs: int, lr: float) -> float:
    """Step 4: the same optimiser and budget for either start; returns test accuracy."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=True, verbose=0)
    return float(model.evaluate(x_test, y_test, verbose=0)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller settings (for tests)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=5, help="Keras fine-tuning epochs (the shared budget)")
    parser.add_argument("--train-size", type=int, default=25, help="labelled held-out images to fine-tune on")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registry", type=Path, help="folder for the weights and registry YAML (default: temporary)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: temporary)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps = min(args.pretrain_steps, 150)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    x, y = digits()
    torch_model = pretrain_torch(x[:1200], y[:1200], args.hidden, args.pretrain_steps, args.seed)
    with torch.no_grad():
        acc10 = float((torch_model(torch.from_numpy(x[1200:])).argmax(1).numpy() == y[1200:]).mean())
    print(f"pytorch pretraining (10 digits, held-out): accuracy {acc10:.3f}")

    # The new task, on images the pretraining never saw: which of 0-4 is it?
    held_out = np.arange(1200, len(x))
    order = np.random.default_rng(args.seed).permutation(held_out[y[held_out] < 5])
    tr, te = order[:args.train_size], order[args.train_size:]
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]

    with tempfile.TemporaryDirectory() as tmp:
        registry = publish(torch_model, args.registry or Path(tmp) / "published", args.hidden)
        print(f"published {ENTRY} in {registry}")

        import keras
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(args.seed)
        pretrained, report = hubload.load(ENTRY, framework="tf", num_classes=5, registry=registry,
                                          cache_dir=args.cache or Path(tmp) / "cache", return_report=True)
    print(report.summary())
    before = float(np.mean(np.argmax(pretrained.predict(x_te, verbose=0), 1) == y_te))
    print(f"before fine-tuning (pretrained backbone, new head): accuracy {before:.3f}")
    pre_acc = finetune_keras(pretrained, x_tr, y_tr, x_te, y_te, args.epochs, args.lr)
    print(f"after fine-tuning, pretrained start: accuracy {pre_acc:.3f}")

    from hubload.adapters import zoo_keras

    keras.utils.set_random_seed(args.seed)
    scratch = zoo_keras.mlp(in_features=64, hidden=args.hidden, num_classes=5)
    rnd_acc = finetune_keras(scratch, x_tr, y_tr, x_te, y_te, args.epochs, args.lr)
    print(f"after fine-tuning, random start: accuracy {rnd_acc:.3f}")
    print(f"pretrained start {'beats' if pre_acc > rnd_acc else 'does not beat'} random start by "
          f"{pre_acc - rnd_acc:+.3f} ({args.epochs} epochs on {len(x_tr)} examples each)")


if __name__ == "__main__":
    main()
