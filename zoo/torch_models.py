"""PyTorch half of hubload's twin-architecture zoo: BERT, ResNet-18/50 and a small MLP.

Each model's ``state_dict()`` keys are the names its published checkpoints use (Hugging Face
``BertModel``, torchvision ``resnet18``/``resnet50``), so weights load with no per-model conversion.
The Keras twins in :mod:`hubload.zoo.keras_models` use attribute paths that map to the same names
through hubload's Keras<->canonical rule table.

The registry refers to the factories as ``"hubload.zoo.torch_models:bert"`` etc.; each takes the
architecture config as keywords and returns a built model in eval mode (what loading weights for
inference wants; call ``.train()`` to fine-tune).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hubload.zoo._config import check_bert_config

__all__ = [
    "BasicBlock",
    "BertModel",
    "Bottleneck",
    "MLP",
    "ResNet",
    "bert",
    "mean_pool",
    "mlp",
    "resnet18",
    "resnet50",
]

# Hugging Face's names for the activations; "gelu" is the exact erf form.
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ---------------------------------------------------------------------------------------------- BERT


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int,
                 type_vocab_size: int, layer_norm_eps: float, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        # Non-persistent: derived data, so it stays out of state_dict (old HF checkpoints still carry it).
        self.register_buffer("position_ids", torch.arange(max_position_embeddings).unsqueeze(0),
                             persistent=False)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Embed ``input_ids`` [batch, seq] into [batch, seq, hidden]."""
        seq_len = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings(self.position_ids[:, :seq_len])
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate query/key/value projections."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout_p = dropout

    def _split_heads(self, x: Tensor) -> Tensor:
        """[batch, seq, hidden] -> [batch, heads, seq, head_dim]."""
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, -1).transpose(1, 2)

    def forward(self, hidden: Tensor, mask_bias: Tensor | None) -> Tensor:
        """Attend over ``hidden``; ``mask_bias`` [batch, 1, 1, seq] is added to the scores."""
        q, k, v = (self._split_heads(proj(hidden)) for proj in (self.query, self.key, self.value))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, -1)


class BertResidualOutput(nn.Module):
    """Dense -> dropout -> LayerNorm(x + residual): HF's ``BertSelfOutput`` and ``BertOutput``."""

    def __init__(self, in_size: int, hidden_size: int, layer_norm_eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """Project ``x`` and add it to ``residual``."""
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """``self`` attention followed by its residual ``output`` block."""

    def __init__(self, hidden_size: int, num_heads: int, layer_norm_eps: float,
                 hidden_dropout: float, attention_dropout: float) -> None:
        super().__init__()
        # HF names this submodule "self"; the attribute name is what makes the checkpoint keys match.
        setattr(self, "self", BertSelfAttention(hidden_size, num_heads, attention_dropout))
        self.output = BertResidualOutput(hidden_size, hidden_size, layer_norm_eps, hidden_dropout)

    def forward(self, hidden: Tensor, mask_bias: Tensor | None) -> Tensor:
        """Self-attention sublayer."""
        return self.output(getattr(self, "self")(hidden, mask_bias), hidden)


class BertIntermediate(nn.Module):
    """The feed-forward expansion: dense + activation."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        """Expand and activate."""
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One transformer encoder layer."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, act: Callable[[Tensor], Tensor],
                 layer_norm_eps: float, hidden_dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, layer_norm_eps, hidden_dropout, attention_dropout)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size, act)
        self.output = BertResidualOutput(intermediate_size, hidden_size, layer_norm_eps, hidden_dropout)

    def forward(self, hidden: Tensor, mask_bias: Tensor | None) -> Tensor:
        """Attention then feed-forward, each with a residual LayerNorm."""
        attended = self.attention(hidden, mask_bias)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    """The stack of encoder layers (``encoder.layer.N``)."""

    def __init__(self, layers: list[BertLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)

    def forward(self, hidden: Tensor, mask_bias: Tensor | None) -> Tensor:
        """Run every layer in turn."""
        for layer in self.layer:
            hidden = layer(hidden, mask_bias)
        return hidden


class BertPooler(nn.Module):
    """tanh(dense(hidden[:, 0])): the [CLS] summary HF calls ``pooler_output``."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """Pool the last hidden state [batch, seq, hidden] into [batch, hidden]."""
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """BERT encoder whose ``state_dict`` keys equal Hugging Face ``BertModel``'s.

    ``forward`` returns the last hidden state; apply ``self.pooler`` (if present) for HF's
    ``pooler_output`` or :func:`mean_pool` for a sentence-transformers embedding.
    """

    def __init__(self, *, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, type_vocab_size: int,
                 layer_norm_eps: float, hidden_act: str, hidden_dropout_prob: float,
                 attention_probs_dropout_prob: float, add_pooler: bool) -> None:
        super().__init__()
        act = _ACTIVATIONS[hidden_act]
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps, hidden_dropout_prob)
        self.encoder = BertEncoder([
            BertLayer(hidden_size, num_attention_heads, intermediate_size, act, layer_norm_eps,
                      hidden_dropout_prob, attention_probs_dropout_prob)
            for _ in range(num_hidden_layers)
        ])
        self.pooler = BertPooler(hidden_size) if add_pooler else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Encode a batch of token ids.

        Args:
            input_ids: Integer tensor [batch, seq].
            attention_mask: 1 for tokens to attend to, 0 for padding, [batch, seq]; None attends to all.
            token_type_ids: Segment ids [batch, seq]; None means all zeros.

        Returns:
            The last hidden state [batch, seq, hidden].
        """
        hidden = self.embeddings(input_ids, token_type_ids)
        mask_bias = None
        if attention_mask is not None:
            # HF's additive mask: the dtype's most negative value on padded keys, 0 elsewhere.
            keep = attention_mask[:, None, None, :].to(hidden.dtype)
            mask_bias = (1.0 - keep) * torch.finfo(hidden.dtype).min
        return self.encoder(hidden, mask_bias)


def _init_bert(module: nn.Module, std: float) -> None:
    """HF's BERT initialisation: N(0, std) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def bert(*, vocab_size: int = 30522, hidden_size: int = 768, num_hidden_layers: int = 12,
         num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
         type_vocab_size: int = 2, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
         hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1,
         initializer_range: float = 0.02, add_pooler: bool = True) -> BertModel:
    """Build a BERT encoder (bert-base-uncased defaults; keys as in HF ``BertConfig``).

    The model has no task head; ``pooler.dense.*`` (present when ``add_pooler``) is HF's pooler.

    Args:
        vocab_size: Rows of ``embeddings.word_embeddings.weight``.
        hidden_size: Width of every hidden state.
        num_hidden_layers: Number of ``encoder.layer.N`` blocks.
        num_attention_heads: Attention heads per layer; must divide ``hidden_size``.
        intermediate_size: Width of the feed-forward expansion.
        max_position_embeddings: Longest supported sequence.
        type_vocab_size: Number of token-type (segment) ids.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: "gelu" (exact erf), "gelu_new"/"gelu_pytorch_tanh" (tanh approximation) or "relu".
        hidden_dropout_prob: Dropout after embeddings and dense projections (training only).
        attention_probs_dropout_prob: Dropout on attention probabilities (training only).
        initializer_range: Std of the normal initialiser for fresh weights.
        add_pooler: Whether to create ``pooler.dense``.

    Returns:
        A :class:`BertModel` in eval mode.

    Raises:
        RegistryError: If ``hidden_act`` is unknown or the heads do not divide ``hidden_size``.
    """
    check_bert_config(hidden_size, num_attention_heads, hidden_act, _ACTIVATIONS)
    model = BertModel(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max_position_embeddings, type_vocab_size=type_vocab_size,
                      layer_norm_eps=layer_norm_eps, hidden_act=hidden_act,
                      hidden_dropout_prob=hidden_dropout_prob,
                      attention_probs_dropout_prob=attention_probs_dropout_prob, add_pooler=add_pooler)
    model.apply(lambda m: _init_bert(m, initializer_range))
    return model.eval()


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

