"""Keras 3 half of hubload's twin-architecture zoo: ResNet-18/50, the seed MLP, and ``mean_pool``.

The models are subclassed, and their attribute paths are chosen so that
:func:`hubload.adapters._keras_paths.keras_variable_paths` plus the Keras->canonical rule table
(``/``->``.``, ``kernel``->``weight`` transposed, ``gamma``/``beta``->``weight``/``bias``,
``moving_mean``/``moving_variance``->``running_mean``/``running_var``) give exactly the PyTorch twins'
``state_dict`` keys in :mod:`hubload.zoo.torch_models`, which are the published checkpoints' names. E.g.
``layer1/0/conv1/kernel`` is ``layer1.0.conv1.weight``. BERT is not here: registry entries build keras-hub's
``BertBackbone`` (see :mod:`hubload.families`); ``mean_pool`` turns its ``sequence_output`` into sentence
embeddings.

Each factory takes the architecture config as keywords and returns a built model (variables exist).
Images are NHWC here (NCHW in the torch twin). The code uses ``keras.ops`` only, but it is verified on
the TensorFlow backend, the one hubload's Keras path targets: with the torch backend Keras stores
sublayers in ``_modules``, which the attribute-path naming does not expect.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "MLP",
    "ResNet",
    "mean_pool",
    "mlp",
    "resnet18",
    "resnet50",
]


# ------------------------------------------------------------------------------------------ pooling


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Average the hidden states of non-padded tokens (sentence-transformers' mean pooling).

    Args:
        hidden: Last hidden state [batch, seq, hidden].
        mask: Attention mask [batch, seq], 1 for real tokens, 0 for padding.

    Returns:
        Sentence embeddings [batch, hidden]; a row with no tokens pools to zeros.
    """
    weights = ops.expand_dims(ops.cast(mask, hidden.dtype), -1)
    # Clamp so an all-padding row gives 0 rather than NaN.
    return ops.sum(hidden * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1e-9)


# -------------------------------------------------------------------------------------------- ResNet


class _Conv2D(keras.layers.Conv2D):
    """Bias-free Conv2D with PyTorch's symmetric zero padding (ZeroPadding2D + "valid").

    Keras' "same" pads asymmetrically for even inputs with stride 2, so it would not match
    ``nn.Conv2d(padding=p)``. Initialised like torchvision (He normal, fan_out).
    """

    def __init__(self, filters: int, kernel_size: int, stride: int = 1, padding: int = 0, **kwargs: Any) -> None:
        super().__init__(filters, kernel_size, strides=stride, padding="valid", use_bias=False,
                         kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
                         **kwargs)
        self.torch_padding = padding
        self._pad = keras.layers.ZeroPadding2D(padding) if padding else None

    def call(self, x: Any) -> Any:
        """Pad, then convolve."""
        return super().call(self._pad(x) if self._pad is not None else x)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """Output shape of the padded convolution."""
        b, h, w, c = input_shape
        p = 2 * self.torch_padding
        return super().compute_output_shape((b, None if h is None else h + p, None if w is None else w + p, c))


def _bn() -> keras.layers.BatchNormalization:
    """BatchNorm with PyTorch's defaults (eps 1e-5; torch momentum 0.1 is Keras momentum 0.9)."""
    return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)


def _run(layers: list[keras.layers.Layer] | None, x: Any) -> Any:
    """Apply a list of layers in order (an empty/None list is the identity)."""
    for layer in layers or ():
        x = layer(x)
    return x


class BasicBlock(keras.layers.Layer):
    """ResNet-18/34 block: two 3x3 convolutions and a residual connection."""

    expansion = 1

    def __init__(self, planes: int, stride: int = 1, downsample: list[keras.layers.Layer] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv1 = _Conv2D(planes, 3, stride, padding=1)
        self.bn1 = _bn()
        self.conv2 = _Conv2D(planes, 3, padding=1)
        self.bn2 = _bn()
        self.downsample = downsample

    def call(self, x: Any) -> Any:
        """conv-bn-relu-conv-bn, plus the (downsampled) input, then relu."""
        identity = _run(self.downsample, x)
        out = ops.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return ops.relu(out + identity)


class Bottleneck(keras.layers.Layer):
    """ResNet-50+ block (v1.5: the stride sits on the 3x3 convolution): 1x1 -> 3x3 -> 1x1 (x4 width)."""

    expansion = 4

    def __init__(self, planes: int, stride: int = 1, downsample: list[keras.layers.Layer] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv1 = _Conv2D(planes, 1)
        self.bn1 = _bn()
        self.conv2 = _Conv2D(planes, 3, stride, padding=1)
        self.bn2 = _bn()
        self.conv3 = _Conv2D(planes * self.expansion, 1)
        self.bn3 = _bn()
        self.downsample = downsample

    def call(self, x: Any) -> Any:
        """Three conv-bn stages plus the (downsampled) input, then relu."""
        identity = _run(self.downsample, x)
        out = ops.relu(self.bn1(self.conv1(x)))
        out = ops.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return ops.relu(out + identity)


class ResNet(keras.Model):
    """torchvision's ResNet, with variables mapping to its ``state_dict`` keys; input NHWC, output logits.

    The classification head is ``fc`` (canonical ``fc.weight`` / ``fc.bias``, sized by ``num_classes``).
    PyTorch's ``num_batches_tracked`` buffers have no Keras counterpart.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv1 = _Conv2D(64, 7, 2, padding=3)
        self.bn1 = _bn()
        # Zero padding equals torch's -inf padding here: the max-pool input is post-ReLU, so >= 0.
        self.maxpool = [keras.layers.ZeroPadding2D(1), keras.layers.MaxPooling2D(3, 2)]
        in_ch = 64
        for i, (planes, n_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage, in_ch = self._make_stage(block, in_ch, planes, n_blocks, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = keras.layers.GlobalAveragePooling2D()
        self.fc = keras.layers.Dense(num_classes)

    @staticmethod
    def _make_stage(block: type[BasicBlock] | type[Bottleneck], in_ch: int, planes: int, n_blocks: int,
                    stride: int) -> tuple[list[keras.layers.Layer], int]:
        """One ``layerN`` stage (a list, so paths read ``layerN/i/...``) and its output channel count."""
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = [_Conv2D(out_ch, 1, stride), _bn()]
        blocks = [block(planes, stride, downsample)]
        blocks += [block(planes) for _ in range(n_blocks - 1)]
        return blocks, out_ch

    def call(self, x: Any) -> Any:
        """Images [batch, H, W, 3] -> logits [batch, num_classes]."""
        x = _run(self.maxpool, ops.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = _run(stage, x)
        return self.fc(self.avgpool(x))


def _built_resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int) -> ResNet:
    """A ResNet whose variables exist (built by one call on a small dummy image)."""
    model = ResNet(block, layers, num_classes=num_classes)
    model(ops.zeros((1, 32, 32, 3)))
    return model


def resnet18(*, num_classes: int = 1000) -> ResNet:
    """Build ResNet-18 with variables named like torchvision's parameters.

    Args:
        num_classes: Output size of the head ``fc`` (canonical ``fc.weight`` is [num_classes, 512]).

    Returns:
        A built :class:`ResNet` (NHWC input).
    """
    return _built_resnet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(*, num_classes: int = 1000) -> ResNet:
    """Build ResNet-50 (v1.5) with variables named like torchvision's parameters.

    Args:
        num_classes: Output size of the head ``fc`` (canonical ``fc.weight`` is [num_classes, 2048]).

    Returns:
        A built :class:`ResNet` (NHWC input).
    """
    return _built_resnet(Bottleneck, [3, 4, 6, 3], num_classes)


# ----------------------------------------------------------------------------------------------- MLP


class MLP(keras.Model):
    """``dense1`` (relu) -> ``dense2``; the head is ``dense2`` (canonical ``dense2.*``)."""

    def __init__(self, hidden: int, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense1 = keras.layers.Dense(hidden, activation="relu")
        self.dense2 = keras.layers.Dense(num_classes)

    def call(self, x: Any) -> Any:
        """Features [batch, in_features] -> logits [batch, num_classes]."""
        return self.dense2(self.dense1(x))


def mlp(*, in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> MLP:
    """Build the seed MLP: Dense(hidden, relu) as ``dense1``, then Dense(num_classes) as ``dense2``.

    Args:
        in_features: Input width (fixes ``dense1``'s kernel shape).
        hidden: Width of ``dense1``.
        num_classes: Output size of the head ``dense2``.

    Returns:
        A built :class:`MLP`.
    """
    model = MLP(hidden, num_classes)
    model(ops.zeros((1, in_features)))
    return model
