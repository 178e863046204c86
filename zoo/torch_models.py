"""PyTorch half of hubload's twin-architecture zoo: ResNet-18/50, the seed MLP, and ``mean_pool``.

These are hand-written only because no library class installs here: torchvision's wheels need a CUDA build of
torch. Each model's ``state_dict()`` keys are the names its published checkpoints use (torchvision
``resnet18``/``resnet50``), so weights load with no per-model conversion. The Keras twins in
:mod:`hubload.zoo.keras_models` use attribute paths that map to the same names through hubload's
Keras<->canonical rule table. BERT is not here: registry entries build transformers' ``BertModel`` (see
:mod:`hubload.families`); ``mean_pool`` turns its ``last_hidden_state`` into sentence embeddings.

The registry refers to the factories as ``"hubload.zoo.torch_models:resnet18"`` etc.; each takes the
architecture config as keywords and returns a built model in eval mode (what loading weights for
inference wants; call ``.train()`` to fine-tune).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Average the hidden states of non-padded tokens (sentence-transformers' mean pooling).

    Args:
        hidden: Last hidden state [batch, seq, hidden].
        mask: Attention mask [batch, seq], 1 for real tokens, 0 for padding.

    Returns:
        Sentence embeddings [batch, hidden]; a row with no tokens pools to zeros.
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    # Clamp so an all-padding row gives 0 rather than NaN.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


# -------------------------------------------------------------------------------------------- ResNet


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1, no bias (followed by BatchNorm)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convolutions and a residual connection."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """conv-bn-relu-conv-bn, plus the (downsampled) input, then relu."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50+ block (v1.5: the stride sits on the 3x3 convolution): 1x1 -> 3x3 -> 1x1 (x4 width)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Three conv-bn stages plus the (downsampled) input, then relu."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet, with the same ``state_dict`` keys; input NCHW, output logits.

    The classification head is ``fc.weight`` / ``fc.bias`` (sized by ``num_classes``).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = 64
        for i, (planes, n_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage, in_ch = self._make_stage(block, in_ch, planes, n_blocks, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # torchvision's initialisation, so an untrained twin behaves like an untrained torchvision model.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(block: type[BasicBlock] | type[Bottleneck], in_ch: int, planes: int, n_blocks: int,
                    stride: int) -> tuple[nn.Sequential, int]:
        """One ``layerN`` stage and its output channel count."""
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        blocks = [block(in_ch, planes, stride, downsample)]
        blocks += [block(out_ch, planes) for _ in range(n_blocks - 1)]
        return nn.Sequential(*blocks), out_ch

    def forward(self, x: Tensor) -> Tensor:
        """Images [batch, 3, H, W] -> logits [batch, num_classes]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(*, num_classes: int = 1000) -> ResNet:
    """Build ResNet-18 with torchvision's parameter names.

    Args:
        num_classes: Output size of the head ``fc.*`` (``fc.weight`` is [num_classes, 512]).

    Returns:
        A :class:`ResNet` in eval mode.
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes).eval()


def resnet50(*, num_classes: int = 1000) -> ResNet:
    """Build ResNet-50 (v1.5) with torchvision's parameter names.

    Args:
        num_classes: Output size of the head ``fc.*`` (``fc.weight`` is [num_classes, 2048]).

    Returns:
        A :class:`ResNet` in eval mode.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes).eval()


# ----------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """``dense1`` (relu) -> ``dense2``; the head is ``dense2.*``."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.dense1 = nn.Linear(in_features, hidden)
        self.dense2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Features [batch, in_features] -> logits [batch, num_classes]."""
        return self.dense2(F.relu(self.dense1(x)))


def mlp(*, in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> MLP:
    """Build the seed MLP: Linear(in_features, hidden) + relu, then Linear(hidden, num_classes).

    Args:
        in_features: Input width.
        hidden: Width of ``dense1``.
        num_classes: Output size of the head ``dense2.*``.

    Returns:
        An :class:`MLP` in eval mode.
    """
    return MLP(in_features, hidden, num_classes).eval()

