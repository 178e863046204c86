"""PyTorch side of behaviour checks: describe modules, run probe inputs with a recorded call, snapshot/restore.

* :func:`describe` — one :class:`~hubload.behaviour.LayerDesc` per module that owns weights, keyed by the
  canonical prefix of its ``state_dict`` keys, from the module's attributes (stride, padding, dilation,
  groups, bias, eps, GELU approximation, RNN nonlinearity ...) and, given inputs, from a recorded call:
  forward hooks on every module see ``F.relu``/``torch.tanh`` called functionally in ``forward`` as the
  function between one layer's output and the next layer's input (identified numerically, see
  :func:`hubload.behaviour.analyse`).
* :func:`run` — outputs (and optionally the recorded call) for probe inputs, in eval mode, without grad.
* :func:`snapshot` / :func:`restore` — the model's tensors before a copy, put back (same objects) on failure.
* :func:`read_tensor`, :func:`infer_inputs`, :func:`to_native_inputs`, :func:`to_canonical_inputs`.

Importing this module imports torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hubload.behaviour import Event, LayerDesc, analyse, pad_spec
from hubload.checkpoint import canonical_dtype

__all__ = ["checkpoint_values", "describe", "infer_inputs", "read_tensor", "restore", "run", "snapshot",
           "to_canonical_inputs", "to_native_inputs"]

_POOLS = {nn.MaxPool1d: "max", nn.MaxPool2d: "max", nn.MaxPool3d: "max", nn.AvgPool1d: "avg",
          nn.AvgPool2d: "avg", nn.AvgPool3d: "avg", nn.AdaptiveAvgPool1d: "avg", nn.AdaptiveAvgPool2d: "avg",
          nn.AdaptiveAvgPool3d: "avg", nn.AdaptiveMaxPool1d: "max", nn.AdaptiveMaxPool2d: "max",
          nn.AdaptiveMaxPool3d: "max", nn.LPPool2d: "lp"}
_ACTS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu",
         nn.ELU: "elu", nn.SELU: "selu", nn.Softplus: "softplus", nn.Softsign: "softsign", nn.Softmax: "softmax",
         nn.LogSoftmax: "log_softmax", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.Mish: "mish",
         nn.Hardswish: "hard_swish", nn.Hardsigmoid: "hard_sigmoid", nn.Identity: "identity"}


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    """An int or tuple attribute as an n-tuple."""
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _module_desc(name: str, m: nn.Module) -> LayerDesc:
    """The static descriptor of a module that owns weights."""
    cls = type(m).__name__
    attrs: dict[str, Any] = {}
    kind = cls
    if isinstance(m, nn.Linear):
        kind = "dense"
        attrs["use_bias"] = m.bias is not None
    elif isinstance(m, nn.modules.conv._ConvNd):
        n = len(m.kernel_size)
        transposed = bool(m.transposed)
        kind = f"conv_transpose{n}d" if transposed else f"conv{n}d"
        attrs.update(kernel=_tuple(m.kernel_size, n), stride=_tuple(m.stride, n), dilation=_tuple(m.dilation, n),
                     groups=int(m.groups), use_bias=m.bias is not None)
        if not transposed:
            if isinstance(m.padding, str):
                attrs["padding"] = pad_spec(m.padding, m.kernel_size, m.stride, m.dilation)
            else:
                p = _tuple(m.padding, n)
                attrs["padding"] = pad_spec("explicit", m.kernel_size, m.stride, m.dilation, [(x, x) for x in p])
            attrs["padding_mode"] = m.padding_mode
        else:
            attrs["output_padding"] = _tuple(m.output_padding, n)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        kind = "batchnorm"
        attrs.update(eps=float(m.eps), center=bool(m.affine), scale=bool(m.affine),
                     running_stats=bool(m.track_running_stats))
    elif isinstance(m, nn.LayerNorm):
        kind = "layernorm"
        attrs.update(eps=float(m.eps), scale=m.weight is not None, center=getattr(m, "bias", None) is not None)
    elif isinstance(m, nn.GroupNorm):
        kind = "groupnorm"
        attrs.update(eps=float(m.eps), groups=int(m.num_groups))
    elif isinstance(m, nn.Embedding):
        kind = "embedding"
        attrs["max_norm"] = m.max_norm
    elif isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        kind = {nn.LSTM: "lstm", nn.GRU: "gru"}.get(type(m), "rnn")
        attrs.update(activation=getattr(m, "nonlinearity", "tanh"), use_bias=bool(m.bias),
                     bidirectional=bool(m.bidirectional), num_layers=int(m.num_layers))
        if kind != "rnn":
            attrs["recurrent_activation"] = "sigmoid"
        if kind == "gru":
            attrs["reset_after"] = True
    elif isinstance(m, nn.MultiheadAttention):
        kind = "mha"
        attrs["num_heads"] = int(m.num_heads)
    elif isinstance(m, nn.PReLU):
        kind = "prelu"
    return LayerDesc(name, kind, cls, "torch", attrs)


def _prefixes(model: nn.Module, spec: Mapping[str, Any]) -> dict[str, nn.Module]:
    """Canonical prefix -> the module owning those tensors (state_dict keys are module paths)."""
    out: dict[str, nn.Module] = {}
    for name, t in spec.items():
        prefix = name.rpartition(".")[0]
        native_prefix = str(getattr(t, "native", name)).rpartition(".")[0]
        if prefix in out:
            continue
        try:
            out[prefix] = model.get_submodule(native_prefix) if native_prefix else model
        except AttributeError:
            continue
    return out


def _event_kind(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """Kind and attrs of a module without weights worth recording, or None."""
    for cls, pool in _POOLS.items():
        if isinstance(m, cls):
            return "pool", {"pool": pool}
    for cls, act in _ACTS.items():
        if type(m) is cls:
            if cls is nn.GELU:
                act = "gelu_tanh" if m.approximate == "tanh" else "gelu"
            return ("identity" if act == "identity" else "activation"), {"act": act}
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return "dropout", {}
    if isinstance(m, nn.Flatten):
        return "flatten", {}
    if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad2d)):
        p = m.padding  # torch order: (left, right, top, bottom)
        pairs = [(p[i], p[i + 1]) for i in range(0, len(p), 2)][::-1]
        return "pad", {"pads": pairs}
    return None


def _first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a (nested) output."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _np(t: torch.Tensor | None) -> Any:
    """A float numpy copy (bfloat16/half widened)."""
    if t is None:
        return None
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy().copy()


def _outputs(obj: Any) -> list[Any]:
    """Every tensor of a model output, in order, as numpy."""
    if isinstance(obj, torch.Tensor):
        return [_np(obj)]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [x for o in obj for x in _outputs(o)]
    return []


@contextlib.contextmanager
def _recording(model: nn.Module, prefixes: Mapping[str, nn.Module]) -> Iterator[list[Event]]:
    """Hooks recording every weighted or known module call as an :class:`Event`."""
    by_id = {id(m): p for p, m in prefixes.items()}
    events: list[Event] = []
    stack: list[int] = []
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    def pre(mod: nn.Module, args: tuple[Any, ...], info: tuple[str | None, str, dict[str, Any], str]) -> None:
        key, kind, attrs, label = info
        parent = stack[-1] if stack else None
        x = _first_tensor(args)
        events.append(Event(label, key, kind, parent, _np(x), None, dict(attrs)))
        stack.append(len(events) - 1)

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        i = stack.pop()
        events[i].out = _np(_first_tensor(out))

    for m in model.modules():
        key = by_id.get(id(m))
        if key is not None:
            info = (key, _module_desc(key, m).kind, {}, key)
        else:
            ek = _event_kind(m)
            if ek is None:
                continue
            info = (None, ek[0], ek[1], names.get(id(m), type(m).__name__))
        handles.append(m.register_forward_pre_hook(lambda mod, args, _i=info: pre(mod, args, _i)))
        handles.append(m.register_forward_hook(post))
    try:
        yield events
    finally:
        for h in handles:
            h.remove()


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and float dtype of the model's first floating-point tensor."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def run(model: nn.Module, inputs: Sequence[Any], *, spec: Mapping[str, Any] | None = None,
        record: bool = False, values: Mapping[str, Any] | None = None) -> tuple[list[Any], list[Event]]:
    """Run the model on probe inputs in eval mode (no grad) and return its outputs as numpy arrays.

    Args:
        model: The module.
        inputs: Positional inputs (numpy arrays or tensors), in the torch convention.
        spec: The model's spec (needed with ``record``: it names the layers).
        record: Also return the recorded call.
        values: Run with these tensors instead of the model's own (``state_dict`` key -> tensor, from
            :func:`checkpoint_values`), through ``torch.func.functional_call``: the model is not changed.

    Returns:
        ``(outputs, events)`` (events empty unless ``record``).
    """
    device, dtype = _device_dtype(model)
    if device.type == "meta":
        raise RuntimeError("the model is on the meta device")
    args = []
    for x in inputs:
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        if t.is_floating_point():
            t = t.to(dtype)
        args.append(t.to(device))
    was_training = model.training
    model.eval()

    def call() -> Any:
        if values is None:
            return model(*args)
        return torch.func.functional_call(model, dict(values), tuple(args), strict=False)

    try:
        with torch.no_grad():
            if record:
                with _recording(model, _prefixes(model, spec or {})) as events:
                    out = call()
                return _outputs(out), events
            return _outputs(call()), []
    finally:
        model.train(was_training)


def checkpoint_values(model: nn.Module, report: Any, reader: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The report's matched tensors as the model would hold them after the copy (views where possible).

    Used to verify a load before it happens (:func:`run` with ``values=``): nothing is copied into the model.
    """
    from hubload.adapters.torch import relayout, to_torch

    out: dict[str, Any] = {}
    for m in report.matched:
        target = spec[m.key]
        t, _ = to_torch(reader, m.source, owned=False)
        t = relayout(t, m.transform)
        handle = target.handle
        if isinstance(handle, torch.Tensor) and not handle.is_meta:
            t = t.to(device=handle.device, dtype=handle.dtype)
        out[str(target.native)] = t
    return out


def describe(model: nn.Module, spec: Mapping[str, Any], inputs: Sequence[Any] | None = None) -> dict[str, LayerDesc]:
    """Descriptors of the model's weighted modules, with the recorded call's facts when ``inputs`` are given.

    Args:
        model: The module.
        spec: Its canonical spec (``spec(model)``).
        inputs: Probe inputs (torch convention), or None for attributes only.

    Returns:
        Canonical prefix -> :class:`~hubload.behaviour.LayerDesc`.
    """
    prefixes = _prefixes(model, spec)
    descs = {p: _module_desc(p, m) for p, m in prefixes.items()}
    if inputs is not None and _device_dtype(model)[0].type != "meta":
        outputs, events = run(model, inputs, spec=spec, record=True)
        dtype = canonical_dtype(_device_dtype(model)[1])
        analyse(descs, events, outputs[0] if outputs else None, dtype)
    return descs


def snapshot(model: nn.Module, names: Sequence[str], spec: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The named tensors (objects and copies of their values) before a copy.

    Args:
        model: The module.
        names: Canonical names (spec keys) that the copy will change.
        spec: The model's spec (``handle`` = the Parameter/buffer).

    Returns:
        Opaque snapshot for :func:`restore`.
    """
    snap = {}
    for n in names:
        t = spec[n]
        obj = t.handle
        if isinstance(obj, torch.Tensor):
            snap[str(t.native)] = (obj, None if obj.is_meta else obj.detach().clone())
    return snap


def restore(model: nn.Module, snap: Mapping[str, tuple[Any, Any]]) -> None:
    """Put the snapshot's tensors back: the same Parameter/buffer objects, with their old values."""
    with torch.no_grad():
        for obj, value in snap.values():
            if value is not None:
                obj.copy_(value)
    model.load_state_dict({k: obj for k, (obj, _) in snap.items()}, strict=False, assign=True)


def read_tensor(t: Any) -> torch.Tensor:
    """A spec entry's current value in the canonical layout (a detached copy)."""
    return t.handle.detach().clone()


def _first_weighted(model: nn.Module) -> nn.Module | None:
    """The first module (registration order) that owns weights."""
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            return m
    return None


def infer_inputs(model: nn.Module) -> list[Any] | None:
    """Probe inputs for the model, from the shapes its first layer expects; None if unknown.

    Linear: ``[2, in_features]``; Conv: ``[2, C, 32, ...]``; Embedding: token ids ``[2, 8]``; RNN:
    ``[2, 5, input_size]``. Values come from hubload's seeded generator.
    """
    from hubload.probe import make_input

    m = _first_weighted(model)
    if isinstance(m, nn.Linear):
        return [make_input({"shape": [2, m.in_features]})]
    if isinstance(m, nn.modules.conv._ConvNd):
        # A torch model does not record its input size: take the first common size it runs on.
        for size in (32, 8, 16, 28, 64, 224):
            x = make_input({"shape": [2, m.in_channels] + [size] * len(m.kernel_size)})
            try:
                run(model, [x])
            except Exception:  # noqa: BLE001 - a size the model does not take
                continue
            return [x]
        return None
    if isinstance(m, nn.Embedding):
        return [make_input({"shape": [2, 8], "dtype": "int64", "high": m.num_embeddings})]
    if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        shape = [2, 5, m.input_size] if m.batch_first else [5, 2, m.input_size]
        return [make_input({"shape": shape})]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return [make_input({"shape": [2, m.num_features] + ([8, 8] if isinstance(m, nn.BatchNorm2d) else [])})]
    if isinstance(m, nn.LayerNorm):
        return [make_input({"shape": [2, 4, *m.normalized_shape]})]
    return None


def to_native_inputs(model: nn.Module, inputs: Sequence[Any]) -> list[Any]:
    """Canonical (channels-first) inputs are torch's own."""
    return [np.asarray(x) if not isinstance(x, torch.Tensor) else _np(x) for x in inputs]


def to_canonical_inputs(model: nn.Module, inputs: Sequence[Any]) -> list[Any]:
    """torch inputs are canonical already."""
    return to_native_inputs(model, inputs)
