"""The seed example of the design card as test models: Keras subclassed ``MyModel`` and its PyTorch twin.

Import after ``pytest.importorskip("torch")`` / ``("keras")``: this module imports both frameworks.
"""

from __future__ import annotations

import keras
import torch

IN_FEATURES = 8


class MyModel(keras.Model):
    """The seed example: Dense(64, relu) as dense1, Dense(10) as dense2."""

    def __init__(self) -> None:
        super().__init__()
        self.dense1 = keras.layers.Dense(64, activation="relu")
        self.dense2 = keras.layers.Dense(10)

    def call(self, x):
        return self.dense2(self.dense1(x))


class TorchMyModel(torch.nn.Module):
    """MyModel's PyTorch twin: same attribute names, nn.Linear layers."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.dense1 = torch.nn.Linear(IN_FEATURES, hidden)
        self.dense2 = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        return self.dense2(torch.relu(self.dense1(x)))
