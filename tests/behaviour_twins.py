"""Tiny torch/Keras twins whose weights line up by name and shape, computing the same thing or not.

Each factory returns a fresh model; Keras ones are built. Attribute names are shared so canonical names agree.
Import after ``pytest.importorskip("torch")`` / ``("keras")``.
"""

from __future__ import annotations

import keras
import numpy as np
import torch
import torch.nn.functional as F
from keras import ops
from torch import nn

IN = 6


# ------------------------------------------------------------------------------------------------ torch


class TMLP(nn.Module):
    """dense1 -> act -> dense2 (-> optional softmax)."""

    def __init__(self, act: str = "relu", softmax: bool = False) -> None:
        super().__init__()
        self.dense1 = nn.Linear(IN, 16)
        self.dense2 = nn.Linear(16, 4)
        self.act, self.softmax = act, softmax

    def forward(self, x):
        h = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu,
             "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.act](self.dense1(x))
        y = self.dense2(h)
        return torch.softmax(y, -1) if self.softmax else y


class TResidual(nn.Module):
    """dense1 -> relu -> dense2 (+ x if residual) -> head."""

    def __init__(self, residual: bool = True) -> None:
        super().__init__()
        self.dense1 = nn.Linear(IN, IN)
        self.dense2 = nn.Linear(IN, IN)
        self.head = nn.Linear(IN, 3)
        self.residual = residual

    def forward(self, x):
        h = self.dense2(F.relu(self.dense1(x)))
        return self.head(h + x if self.residual else h)


class TConv(nn.Module):
    """conv (stride/padding/dilation) -> bn(eps) -> relu -> pool -> flatten -> fc."""

    def __init__(self, stride: int = 1, padding: int = 0, dilation: int = 1, eps: float = 1e-5,
                 pool: str = "max", size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm2d(4, eps=eps)
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        out = (size + 2 * padding - dilation * 2 - 1) // stride + 1
        self.fc = nn.Linear(4 * (out // 2) ** 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(self.conv(x)))), 1))


class TNorm(nn.Module):
    """dense -> LayerNorm(eps) -> out."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.dense = nn.Linear(IN, 8)
        self.norm = nn.LayerNorm(8, eps=eps)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.norm(self.dense(x)))


# ------------------------------------------------------------------------------------------------ keras


def _built(model: keras.Model, shape: tuple[int, ...]) -> keras.Model:
    model(np.zeros((1, *shape), "float32"))
    return model


class KMLP(keras.Model):
    def __init__(self, act: str = "relu", softmax: bool = False) -> None:
        super().__init__()
        self.dense1 = keras.layers.Dense(16, activation={"gelu_tanh": None}.get(act, act))
        self.dense2 = keras.layers.Dense(4, activation="softmax" if softmax else None)
        self.tanh_gelu = act == "gelu_tanh"

    def call(self, x):
        h = self.dense1(x)
        if self.tanh_gelu:
            h = ops.gelu(h, approximate=True)
        return self.dense2(h)


class KResidual(keras.Model):
    def __init__(self, residual: bool = True) -> None:
        super().__init__()
        self.dense1 = keras.layers.Dense(IN, activation="relu")
        self.dense2 = keras.layers.Dense(IN)
        self.head = keras.layers.Dense(3)
        self.residual = residual

    def call(self, x):
        h = self.dense2(self.dense1(x))
        return self.head(h + x if self.residual else h)


class KConv(keras.Model):
    def __init__(self, stride: int = 1, padding: str | int = "valid", dilation: int = 1, eps: float = 1e-3,
                 pool: str = "max") -> None:
        super().__init__()
        self.zpad = keras.layers.ZeroPadding2D(padding) if isinstance(padding, int) and padding else None
        self.conv = keras.layers.Conv2D(4, 3, strides=stride, dilation_rate=dilation,
                                        padding=padding if isinstance(padding, str) else "valid")
        self.bn = keras.layers.BatchNormalization(epsilon=eps)
        self.pool = keras.layers.MaxPooling2D(2) if pool == "max" else keras.layers.AveragePooling2D(2)
        self.flatten = keras.layers.Flatten()
        self.fc = keras.layers.Dense(5)

    def call(self, x):
        if self.zpad is not None:
            x = self.zpad(x)
        return self.fc(self.flatten(self.pool(ops.relu(self.bn(self.conv(x))))))


class KNorm(keras.Model):
    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(8)
        self.norm = keras.layers.LayerNormalization(epsilon=eps)
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.norm(self.dense(x)))


def kmlp(**kw):
    return _built(KMLP(**kw), (IN,))


def kres(**kw):
    return _built(KResidual(**kw), (IN,))


def kconv(**kw):
    return _built(KConv(**kw), (8, 8, 3))


def knorm(**kw):
    return _built(KNorm(**kw), (IN,))


def randomise_torch(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (so eps and pooling differences show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.05)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


def randomise_keras(model: keras.Model, seed: int) -> keras.Model:
    """Random variable values (moving variance positive)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        if "moving_variance" in v.path:
            v.assign(rng.random(shape).astype("float32") * 0.5 + 0.05)
        else:
            v.assign((rng.standard_normal(shape) * 0.5).astype("float32"))
    return model
