"""Keras 3 half of hubload's twin-architecture zoo: BERT, ResNet-18/50 and a small MLP.

The models are subclassed, and their attribute paths are chosen so that
:func:`hubload.adapters._keras_paths.keras_variable_paths` plus the Keras->canonical rule table
(``/``->``.``, ``kernel``->``weight`` transposed, ``gamma``/``beta``->``weight``/``bias``,
``moving_mean``/``moving_variance``->``running_mean``/``running_var``, ``embeddings``->``weight``) give
exactly the PyTorch twins' ``state_dict`` keys in :mod:`hubload.zoo.torch_models`, which are the
published checkpoints' names. E.g. ``encoder/layer/0/attention/self/query/kernel`` is
``encoder.layer.0.attention.self.query.weight``.

Each factory takes the architecture config as keywords and returns a built model (variables exist).
Images are NHWC here (NCHW in the torch twin). The code uses ``keras.ops`` only, but it is verified on
the TensorFlow backend, the one hubload's Keras path targets: with the torch backend Keras stores
sublayers in ``_modules``, which neither the attribute-path naming nor the ``output`` attribute expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

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
_ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "gelu": lambda x: ops.gelu(x, approximate=False),
    "gelu_new": lambda x: ops.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: ops.gelu(x, approximate=True),
    "relu": ops.relu,
}


class _OutputAttr:
    """Mixin letting a layer own a sublayer called ``output``, as HF's BERT modules do.

    Keras' ``Layer.output`` is a read-only property (the symbolic output in functional models); these
    layers are never used that way, and the attribute name is what makes the canonical names match.
    """

    output = None


# ---------------------------------------------------------------------------------------------- BERT


def _dense(units: int, std: float, activation: str | None = None) -> keras.layers.Dense:
    """Dense layer with HF's BERT initialisation."""
    return keras.layers.Dense(units, activation=activation,
                              kernel_initializer=keras.initializers.RandomNormal(stddev=std))


class BertEmbeddings(keras.layers.Layer):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int, type_vocab_size: int,
                 layer_norm_eps: float, dropout: float, std: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=std)
        self.word_embeddings = keras.layers.Embedding(vocab_size, hidden_size, embeddings_initializer=init)
        self.position_embeddings = keras.layers.Embedding(max_position_embeddings, hidden_size,
                                                          embeddings_initializer=init)
        self.token_type_embeddings = keras.layers.Embedding(type_vocab_size, hidden_size,
                                                            embeddings_initializer=init)
        self.LayerNorm = keras.layers.LayerNormalization(epsilon=layer_norm_eps)
        self.dropout = keras.layers.Dropout(dropout)

    def call(self, input_ids: Any, token_type_ids: Any = None) -> Any:
        """Embed ``input_ids`` [batch, seq] into [batch, seq, hidden]."""
        if token_type_ids is None:
            token_type_ids = ops.zeros_like(input_ids)
        positions = ops.expand_dims(ops.arange(ops.shape(input_ids)[1]), 0)
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention with separate query/key/value projections."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, std: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = _dense(hidden_size, std)
        self.key = _dense(hidden_size, std)
        self.value = _dense(hidden_size, std)
        self.dropout = keras.layers.Dropout(dropout)

    def _split_heads(self, x: Any) -> Any:
        """[batch, seq, hidden] -> [batch, heads, seq, head_dim]."""
        shape = ops.shape(x)
        x = ops.reshape(x, (shape[0], shape[1], self.num_heads, self.head_dim))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, hidden: Any, mask_bias: Any = None) -> Any:
        """Attend over ``hidden``; ``mask_bias`` [batch, 1, 1, seq] is added to the scores."""
        q, k, v = (self._split_heads(proj(hidden)) for proj in (self.query, self.key, self.value))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.head_dim**-0.5
        if mask_bias is not None:
            scores = scores + mask_bias
        probs = self.dropout(ops.softmax(scores, axis=-1))
        ctx = ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3))
        shape = ops.shape(ctx)
        return ops.reshape(ctx, (shape[0], shape[1], self.num_heads * self.head_dim))


class BertResidualOutput(keras.layers.Layer):
    """Dense -> dropout -> LayerNorm(x + residual): HF's ``BertSelfOutput`` and ``BertOutput``."""

    def __init__(self, hidden_size: int, layer_norm_eps: float, dropout: float, std: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = _dense(hidden_size, std)
        self.LayerNorm = keras.layers.LayerNormalization(epsilon=layer_norm_eps)
        self.dropout = keras.layers.Dropout(dropout)

    def call(self, x: Any, residual: Any) -> Any:
        """Project ``x`` and add it to ``residual``."""
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(_OutputAttr, keras.layers.Layer):
    """``self`` attention followed by its residual ``output`` block."""

    def __init__(self, hidden_size: int, num_heads: int, layer_norm_eps: float, hidden_dropout: float,
                 attention_dropout: float, std: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # HF names this submodule "self"; the attribute name is what makes the canonical names match.
        setattr(self, "self", BertSelfAttention(hidden_size, num_heads, attention_dropout, std))
        self.output = BertResidualOutput(hidden_size, layer_norm_eps, hidden_dropout, std)

    def call(self, hidden: Any, mask_bias: Any = None) -> Any:
        """Self-attention sublayer."""
        return self.output(getattr(self, "self")(hidden, mask_bias), hidden)


class BertIntermediate(keras.layers.Layer):
    """The feed-forward expansion: dense + activation."""

    def __init__(self, intermediate_size: int, act: Callable[[Any], Any], std: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = _dense(intermediate_size, std)
        self.act = act

    def call(self, x: Any) -> Any:
        """Expand and activate."""
        return self.act(self.dense(x))


class BertLayer(_OutputAttr, keras.layers.Layer):
    """One transformer encoder layer."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, act: Callable[[Any], Any],
                 layer_norm_eps: float, hidden_dropout: float, attention_dropout: float, std: float,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attention = BertAttention(hidden_size, num_heads, layer_norm_eps, hidden_dropout,
                                       attention_dropout, std)
        self.intermediate = BertIntermediate(intermediate_size, act, std)
        self.output = BertResidualOutput(hidden_size, layer_norm_eps, hidden_dropout, std)

    def call(self, hidden: Any, mask_bias: Any = None) -> Any:
        """Attention then feed-forward, each with a residual LayerNorm."""
        attended = self.attention(hidden, mask_bias)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(keras.layers.Layer):
    """The stack of encoder layers (``encoder/layer/N``)."""

    def __init__(self, layers: list[BertLayer], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer = list(layers)

    def call(self, hidden: Any, mask_bias: Any = None) -> Any:
        """Run every layer in turn."""
        for layer in self.layer:
            hidden = layer(hidden, mask_bias)
        return hidden


class BertPooler(keras.layers.Layer):
    """tanh(dense(hidden[:, 0])): the [CLS] summary HF calls ``pooler_output``."""

    def __init__(self, hidden_size: int, std: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = _dense(hidden_size, std, activation="tanh")

    def call(self, hidden: Any) -> Any:
        """Pool the last hidden state [batch, seq, hidden] into [batch, hidden]."""
        return self.dense(hidden[:, 0])


def _mask_bias(attention_mask: Any, dtype: str) -> Any:
    """HF's additive mask [batch, 1, 1, seq]: the dtype's most negative value on padded keys, 0 elsewhere."""
    import ml_dtypes  # finfo that also knows bfloat16

    keep = ops.cast(attention_mask[:, None, None, :], dtype)
    return (1.0 - keep) * float(ml_dtypes.finfo(dtype).min)


class BertModel(keras.Model):
    """BERT encoder whose variables map to Hugging Face ``BertModel``'s parameter names.

    Calling it returns the last hidden state; apply ``self.pooler`` (if present) for HF's
    ``pooler_output`` or :func:`mean_pool` for a sentence-transformers embedding.
    """

    def __init__(self, *, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, type_vocab_size: int,
                 layer_norm_eps: float, hidden_act: str, hidden_dropout_prob: float,
                 attention_probs_dropout_prob: float, initializer_range: float, add_pooler: bool,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        act, std = _ACTIVATIONS[hidden_act], initializer_range
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps, hidden_dropout_prob, std)
        self.encoder = BertEncoder([
            BertLayer(hidden_size, num_attention_heads, intermediate_size, act, layer_norm_eps,
                      hidden_dropout_prob, attention_probs_dropout_prob, std)
            for _ in range(num_hidden_layers)
        ])
        self.pooler = BertPooler(hidden_size, std) if add_pooler else None

    def build(self, input_shape: Any) -> None:
        """Nothing to create up front: the sublayers build on the first call (see :func:`bert`)."""
        self.built = True

    def call(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        """Encode a batch of token ids.

        Args:
            input_ids: Integer tensor [batch, seq].
            attention_mask: 1 for tokens to attend to, 0 for padding, [batch, seq]; None attends to all.
            token_type_ids: Segment ids [batch, seq]; None means all zeros.

        Returns:
            The last hidden state [batch, seq, hidden].
        """
        hidden = self.embeddings(input_ids, token_type_ids)
        mask_bias = None if attention_mask is None else _mask_bias(attention_mask, self.compute_dtype)
        return self.encoder(hidden, mask_bias)


def bert(*, vocab_size: int = 30522, hidden_size: int = 768, num_hidden_layers: int = 12,
         num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
         type_vocab_size: int = 2, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
         hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1,
         initializer_range: float = 0.02, add_pooler: bool = True) -> BertModel:
    """Build a BERT encoder (bert-base-uncased defaults; keys as in HF ``BertConfig``).

    The model has no task head; ``pooler/dense/*`` (present when ``add_pooler``) is HF's pooler.

    Args:
        vocab_size: Rows of ``embeddings/word_embeddings/embeddings``.
        hidden_size: Width of every hidden state.
        num_hidden_layers: Number of ``encoder/layer/N`` blocks.
        num_attention_heads: Attention heads per layer; must divide ``hidden_size``.
        intermediate_size: Width of the feed-forward expansion.
        max_position_embeddings: Longest supported sequence.
        type_vocab_size: Number of token-type (segment) ids.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: "gelu" (exact erf), "gelu_new"/"gelu_pytorch_tanh" (tanh approximation) or "relu".
        hidden_dropout_prob: Dropout after embeddings and dense projections (training only).
        attention_probs_dropout_prob: Dropout on attention probabilities (training only).
        initializer_range: Std of the normal initialiser for fresh weights.
        add_pooler: Whether to create ``pooler/dense``.

    Returns:
        A built :class:`BertModel` (pooler included).

    Raises:
        RegistryError: If ``hidden_act`` is unknown or the heads do not divide ``hidden_size``.
    """
    check_bert_config(hidden_size, num_attention_heads, hidden_act, _ACTIVATIONS)
    model = BertModel(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max_position_embeddings, type_vocab_size=type_vocab_size,
                      layer_norm_eps=layer_norm_eps, hidden_act=hidden_act,
                      hidden_dropout_prob=hidden_dropout_prob,
                      attention_probs_dropout_prob=attention_probs_dropout_prob,
                      initializer_range=initializer_range, add_pooler=add_pooler)
    ids = ops.zeros((1, 2), dtype="int32")
    hidden = model(ids, attention_mask=ops.ones((1, 2), dtype="int32"))
    if model.pooler is not None:  # the forward pass does not touch the pooler; build it too
        model.pooler(hidden)
    return model


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
