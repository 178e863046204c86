"""Keras side of behaviour checks: describe layers, run probe inputs with a recorded call, snapshot/restore.

* :func:`describe` — one :class:`~hubload.behaviour.LayerDesc` per layer that owns variables, keyed by the
  canonical prefix of its variables (found through variable identity, whatever the naming scheme), from the
  layer's config (activation, strides, padding with TF ``'same'`` asymmetry, dilation, groups, use_bias,
  epsilon, RNN activations, GRU ``reset_after`` ...) and, given inputs, from a recorded call: every layer's
  ``call`` is wrapped for one run, so ``ops.relu`` used inside a subclassed ``call`` shows as the function
  between one layer's output and the next layer's input, and ZeroPadding before a ``'valid'`` convolution
  counts as that convolution's padding.
* :func:`run`, :func:`snapshot`, :func:`restore`, :func:`read_tensor`, :func:`infer_inputs`,
  :func:`to_native_inputs` (canonical NCHW -> NHWC for channels-last image models), :func:`to_canonical_inputs`.

Importing this module imports keras.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from hubload.behaviour import Event, LayerDesc, analyse, pad_spec
from hubload.checkpoint import canonical_dtype
from hubload.layout import apply_transform

__all__ = ["checkpoint_values", "describe", "infer_inputs", "read_tensor", "restore", "run", "snapshot",
           "to_canonical_inputs", "to_native_inputs"]

_ACT_NAMES = {"swish": "silu", "linear": "linear", "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid",
              "gelu": "gelu", "silu": "silu", "softmax": "softmax", "elu": "elu", "selu": "selu",
              "softplus": "softplus", "softsign": "softsign", "relu6": "relu6", "log_softmax": "log_softmax",
              "leaky_relu": "leaky_relu(0.2)", "hard_sigmoid": "hard_sigmoid", "exponential": "exp"}


def _classes(layer: Any) -> list[str]:
    """Class names of the layer's MRO (a subclass of Conv2D is described as a Conv2D)."""
    return [c.__name__ for c in type(layer).__mro__]


def _act_name(fn: Any) -> str:
    """hubload's name for a Keras activation function (``?`` when it is a custom callable)."""
    if fn is None:
        return "linear"
    name = getattr(fn, "__name__", None)
    return _ACT_NAMES.get(name, "?") if name else "?"


def _layer_desc(name: str, layer: Any) -> LayerDesc:
    """The static descriptor of a layer that owns variables."""
    mro = _classes(layer)
    cls = type(layer).__name__
    attrs: dict[str, Any] = {}
    kind = cls
    own = "linear"
    if "Dense" in mro:
        kind = "dense"
        attrs["use_bias"] = bool(layer.use_bias)
        own = _act_name(layer.activation)
    elif "EinsumDense" in mro:
        kind = "einsum_dense"
        own = _act_name(getattr(layer, "activation", None))
    elif "BaseConv" in mro or "BaseDepthwiseConv" in mro or "BaseConvTranspose" in mro:
        k = tuple(int(x) for x in layer.kernel_size)
        n = len(k)
        s = tuple(int(x) for x in layer.strides)
        d = tuple(int(x) for x in layer.dilation_rate)
        transposed = "BaseConvTranspose" in mro
        kind = f"conv_transpose{n}d" if transposed else f"conv{n}d"
        if "BaseDepthwiseConv" in mro:
            groups = int(layer.kernel.shape[-2])
        else:
            groups = int(getattr(layer, "groups", 1))
        attrs.update(kernel=k, stride=s, dilation=d, groups=groups, use_bias=bool(layer.use_bias),
                     tf_padding=layer.padding, data_format=layer.data_format)
        if not transposed:
            mode = "valid" if layer.padding == "valid" else "same"
            attrs["padding"] = pad_spec(mode, k, s, d) if layer.padding in ("valid", "same") else layer.padding
            attrs["padding_mode"] = "zeros"
        own = _act_name(layer.activation)
    elif "BatchNormalization" in mro:
        kind = "batchnorm"
        attrs.update(eps=float(layer.epsilon), center=bool(layer.center), scale=bool(layer.scale),
                     running_stats=True)
    elif "LayerNormalization" in mro:
        kind = "rmsnorm" if getattr(layer, "rms_scaling", False) else "layernorm"
        attrs.update(eps=float(layer.epsilon), center=bool(layer.center), scale=bool(layer.scale))
    elif "GroupNormalization" in mro:
        kind = "groupnorm"
        attrs.update(eps=float(layer.epsilon), groups=int(layer.groups))
    elif "Embedding" in mro:
        kind = "embedding"
        attrs["max_norm"] = None
    elif any(c in mro for c in ("LSTMCell", "GRUCell", "SimpleRNNCell", "LSTM", "GRU", "SimpleRNN")):
        cell = getattr(layer, "cell", layer)
        base = "lstm" if "LSTM" in cls else "gru" if "GRU" in cls else "rnn"
        kind = base
        attrs.update(activation=_act_name(cell.activation), use_bias=bool(cell.use_bias), bidirectional=False,
                     num_layers=1)
        if base != "rnn":
            attrs["recurrent_activation"] = _act_name(cell.recurrent_activation)
        if base == "gru":
            attrs["reset_after"] = bool(cell.reset_after)
    elif "PReLU" in mro:
        kind = "prelu"
    return LayerDesc(name, kind, cls, "tf", attrs, own_act=own)


def _own_variables(layer: Any) -> list[Any]:
    """Variables the layer created itself."""
    return [*getattr(layer, "_trainable_variables", ()), *getattr(layer, "_non_trainable_variables", ())]


def _layers(model: Any) -> list[Any]:
    """Every layer of the model, the model included, each once."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def _prefixes(model: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical prefix -> the layer owning those variables (paired by variable identity)."""
    owner: dict[int, Any] = {}
    for layer in _layers(model):
        for v in _own_variables(layer):
            owner.setdefault(id(v), layer)
    out: dict[str, Any] = {}
    for name, t in spec.items():
        layer = owner.get(id(t.handle))
        prefix = name.rpartition(".")[0]
        if layer is not None and prefix not in out:
            out[prefix] = layer
    return out


def _event_kind(layer: Any) -> tuple[str, dict[str, Any], bool] | None:
    """Kind, attrs and channels-last flag of a layer without variables worth recording, or None."""
    mro = _classes(layer)
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    if any(c.startswith(("MaxPooling", "GlobalMaxPooling")) for c in mro):
        return "pool", {"pool": "max"}, channels_last
    if any(c.startswith(("AveragePooling", "GlobalAveragePooling")) for c in mro):
        return "pool", {"pool": "avg"}, channels_last
    if "Flatten" in mro:
        return "flatten", {"channels_last": channels_last}, channels_last
    if "Activation" in mro:
        return "activation", {"act": _act_name(layer.activation)}, False
    if any(c in mro for c in ("ReLU", "Softmax", "LeakyReLU", "ELU")):
        return "activation", {"act": type(layer).__name__.lower()}, False
    if any(c in mro for c in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise",
                              "GaussianDropout", "AlphaDropout")):
        return "dropout", {}, False
    if any(c.startswith("ZeroPadding") for c in mro):
        pads = [tuple(int(x) for x in p) for p in layer.padding]
        return "pad", {"pads": pads}, channels_last
    if "InputLayer" in mro:
        return None
    return "other", {}, False


def _np(x: Any) -> Any:
    """A numpy copy of a tensor (float widened to float32 at least)."""
    if x is None:
        return None
    try:
        a = np.array(keras.ops.convert_to_numpy(x))
    except (TypeError, ValueError, AttributeError):
        return None
    if a.dtype.kind == "f" and a.dtype.itemsize < 4 or a.dtype.kind == "V":
        a = a.astype(np.float32)
    return a


def _first(obj: Any) -> Any:
    """The first tensor of a (nested) structure."""
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            f = _first(o)
            if f is not None:
                return f
        return None
    return obj if hasattr(obj, "shape") else None


def _outputs(obj: Any) -> list[Any]:
    """Every tensor of a model output, in order, as numpy."""
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _outputs(o)]
    return [_np(obj)] if hasattr(obj, "shape") else []


@contextlib.contextmanager
def _recording(model: Any, prefixes: Mapping[str, Any]) -> Iterator[list[Event]]:
    """Wrap every sublayer's ``call`` for one run, recording an :class:`Event` per call."""
    by_id = {id(layer): p for p, layer in prefixes.items()}
    events: list[Event] = []
    stack: list[int] = []
    wrapped: list[tuple[Any, Any]] = []

    for layer in model._flatten_layers(include_self=False, recursive=True):
        key = by_id.get(id(layer))
        if key is not None:
            d = _layer_desc(key, layer)
            kind, attrs = d.kind, {}
            data_format = getattr(layer, "data_format", None)
            channels_last = (data_format == "channels_last" and d.kind.startswith("conv")) or \
                (d.kind == "batchnorm" and int(getattr(layer, "axis", -1) if not isinstance(
                    getattr(layer, "axis", -1), (list, tuple)) else layer.axis[0]) == -1)
            label = key
        else:
            ek = _event_kind(layer)
            if ek is None:
                continue
            kind, attrs, channels_last = ek
            label = layer.name
        original = layer.__dict__.get("call")
        bound = layer.call

        def call(*args: Any, _bound: Any = bound, _info: tuple[Any, ...] = (label, key, kind, attrs, channels_last),
                 **kwargs: Any) -> Any:
            lbl, k, knd, att, cl = _info
            parent = stack[-1] if stack else None
            x = _np(_first(args))
            events.append(Event(lbl, k, knd, parent, x, None, dict(att),
                                channels_last=bool(cl and x is not None and x.ndim >= 3)))
            stack.append(len(events) - 1)
            try:
                out = _bound(*args, **kwargs)
            finally:
                i = stack.pop()
            events[i].out = _np(_first(out))
            return out

        object.__setattr__(layer, "call", call)
        wrapped.append((layer, original))
    try:
        yield events
    finally:
        for layer, original in wrapped:
            if original is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", original)


def run(model: Any, inputs: Sequence[Any], *, spec: Mapping[str, Any] | None = None,
        record: bool = False, values: Mapping[int, Any] | None = None) -> tuple[list[Any], list[Event]]:
    """Run the model on probe inputs (``training=False``) and return its outputs as numpy arrays.

    Args:
        model: A built Keras model.
        inputs: Positional inputs in the Keras convention (channels-last images).
        spec: The model's spec (needed with ``record``).
        record: Also return the recorded call.
        values: Run with these variable values instead of the model's own (from :func:`checkpoint_values`),
            through ``model.stateless_call``: the model's variables are not changed.

    Returns:
        ``(outputs, events)``.
    """
    args = [x if isinstance(x, Mapping) else np.asarray(x) for x in inputs]

    def call() -> Any:
        if values is None:
            return model(*args, training=False)
        trainable = [values.get(id(v), v.value) for v in model.trainable_variables]
        frozen = [values.get(id(v), v.value) for v in model.non_trainable_variables]
        kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
        out, _ = model.stateless_call(trainable, frozen, *args, **kwargs)  # calls .call() directly
        return out

    if record:
        with _recording(model, _prefixes(model, spec or {})) as events:
            out = call()
        return _outputs(out), events
    return _outputs(call()), []


def checkpoint_values(model: Any, report: Any, reader: Any, spec: Mapping[str, Any]) -> dict[int, Any]:
    """The report's matched tensors as the variables would hold them after the copy (keyed by variable id).

    Used to verify a load before it happens (:func:`run` with ``values=``): no variable is assigned.
    """
    from hubload.checkpoint import numpy_dtype, to_numpy

    out: dict[int, Any] = {}
    for m in report.matched:
        target = spec[m.key]
        arr = apply_transform(apply_transform(to_numpy(reader.get(m.source)), m.transform), target.transform)
        var = target.handle
        out[id(var)] = np.ascontiguousarray(arr, dtype=numpy_dtype(canonical_dtype(var.dtype)))
    return out


def _dtype(model: Any) -> str:
    """The model's compute dtype."""
    return canonical_dtype(getattr(model, "compute_dtype", None) or "float32")


def describe(model: Any, spec: Mapping[str, Any], inputs: Sequence[Any] | None = None) -> dict[str, LayerDesc]:
    """Descriptors of the model's layers with variables, with the recorded call's facts given ``inputs``.

    Args:
        model: A built Keras model.
        spec: Its canonical spec.
        inputs: Probe inputs (Keras convention), or None for attributes only.

    Returns:
        Canonical prefix -> :class:`~hubload.behaviour.LayerDesc`.
    """
    prefixes = _prefixes(model, spec)
    descs = {p: _layer_desc(p, layer) for p, layer in prefixes.items()}
    if inputs is not None:
        outputs, events = run(model, inputs, spec=spec, record=True)
        analyse(descs, events, outputs[0] if outputs else None, _dtype(model))
    return descs


def snapshot(model: Any, names: Sequence[str], spec: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """The named variables and copies of their values, before a copy."""
    return [(spec[n].handle, np.array(spec[n].handle.numpy())) for n in names]


def restore(model: Any, snap: Sequence[tuple[Any, Any]]) -> None:
    """Assign the snapshot's values back."""
    for var, value in snap:
        var.assign(value)


def read_tensor(t: Any) -> Any:
    """A spec entry's current value in the canonical layout (numpy)."""
    value = np.array(t.handle.numpy())
    return apply_transform(value, t.transform.inverse() if t.transform is not None else None)


def _first_weighted(model: Any) -> Any:
    """The first layer (walk order) that owns variables."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if _own_variables(layer):
            return layer
    return None


def _channels_last_images(model: Any) -> bool:
    """The model's first layer with variables is a channels-last convolution or BatchNorm."""
    first = _first_weighted(model)
    if first is None:
        return False
    mro = _classes(first)
    conv = "BaseConv" in mro or "BaseDepthwiseConv" in mro or "BaseConvTranspose" in mro
    return conv and getattr(first, "data_format", "channels_last") == "channels_last"


def infer_inputs(model: Any) -> list[Any] | None:
    """Probe inputs (Keras convention) from the shape the model was built or called with; None if unknown."""
    from hubload.probe import make_input

    shapes: list[tuple[Any, str]] = []
    for x in getattr(model, "inputs", None) or []:
        shapes.append((tuple(x.shape), str(getattr(x, "dtype", "float32"))))
    if not shapes:
        built = getattr(model, "_build_shapes_dict", None) or {}
        for v in built.values():
            if isinstance(v, (tuple, list)) and all(d is None or isinstance(d, int) for d in v):
                shapes.append((tuple(v), "float32"))
    if not shapes:
        return None
    first = _first_weighted(model)
    out = []
    for shape, dtype in shapes:
        dims = [2] + [8 if d is None else int(d) for d in shape[1:]]
        if "Embedding" in _classes(first) if first is not None else False:
            out.append(make_input({"shape": dims, "dtype": "int64", "high": int(first.input_dim)}))
        elif "int" in dtype:
            out.append(make_input({"shape": dims, "dtype": "int64", "high": 2}))
        else:
            out.append(make_input({"shape": dims}))
    return out


# keras-hub text backbones take a dict of inputs where transformers models take token ids (and a mask whose
# default is "attend to everything").
_TEXT_INPUT_FILL = {"token_ids": None, "padding_mask": 1, "segment_ids": 0}


def _dict_inputs(model: Any, inputs: Sequence[Any]) -> list[Any] | None:
    """Token ids as a keras-hub backbone's input dict (``token_ids`` + default mask/segments), else None."""
    struct = getattr(model, "_inputs_struct", None)
    if not isinstance(struct, Mapping) or "token_ids" not in struct or len(inputs) != 1:
        return None
    ids = np.asarray(inputs[0])
    if ids.dtype.kind not in "iu" or not set(struct) <= set(_TEXT_INPUT_FILL):
        return None
    return [{k: ids if fill is None else np.full(ids.shape, fill, dtype=ids.dtype)
             for k, fill in _TEXT_INPUT_FILL.items() if k in struct}]


def to_native_inputs(model: Any, inputs: Sequence[Any]) -> list[Any]:
    """Canonical (channels-first) inputs in the Keras convention: images NCHW -> NHWC, token ids -> the dict a
    keras-hub text backbone takes."""
    as_dict = _dict_inputs(model, inputs)
    if as_dict is not None:
        return as_dict
    move = _channels_last_images(model)
    return [np.moveaxis(np.asarray(x), 1, -1) if move and np.asarray(x).ndim >= 3 and
            np.asarray(x).dtype.kind == "f" else np.asarray(x) for x in inputs]


def to_canonical_inputs(model: Any, inputs: Sequence[Any]) -> list[Any]:
    """Keras-convention inputs in the canonical convention: images NHWC -> NCHW."""
    move = _channels_last_images(model)
    return [np.moveaxis(np.asarray(x), -1, 1) if move and np.asarray(x).ndim >= 3 and
            np.asarray(x).dtype.kind == "f" else np.asarray(x) for x in inputs]
