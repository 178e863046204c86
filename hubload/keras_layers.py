"""One spec per Keras layer class: canonical names and reversible conversions of its variables.

The Keras knowledge of hubload lives here, as data, the way Keras' own ``saving_lib`` lets each layer own
``save_own_variables``/``load_own_variables``. A :class:`LayerSpec` says, for one Keras class:

* ``variables``: the layer's variables in creation order (the order of ``vars/0``, ``vars/1`` ... in a
  ``.weights.h5`` file, which drops variable names);
* ``leaves``: Keras leaf -> canonical (PyTorch) leaf and the one-to-one re-layout rule (a
  :class:`~hubload.layout.Transform` built from the variable's shape);
* ``group``: an N-to-M conversion of the layer's variables as a whole (an LSTM's one bias is torch's two,
  a GRU's gates reorder), for layers whose torch counterpart is not one tensor per variable;
* ``children``: the class of sublayers held by known attributes (``MultiHeadAttention.query_dense`` is an
  ``EinsumDense`` with one input axis), so a ``.weights.h5`` reader can name them without the model.

The behaviour check (the attributes that change the numbers: activation, padding, eps ...) is keyed by the
same Keras class name (:attr:`LayerSpec.keras_class`), so one class has one place for everything.

Both sides use this table: :mod:`hubload.adapters.tf` with live layers (class from the MRO, EinsumDense
equation from the layer), :mod:`hubload.keras_h5` with a file (class from the container key or the stored
auto-generated name). It imports neither Keras nor numpy at import time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from hubload.layout import Transform

__all__ = [
    "KERAS_LAYER_SPECS",
    "GroupRule",
    "LayerSpec",
    "RNNGroup",
    "container_segments",
    "einsum_kernel_transform",
    "functional_segments",
    "leaf_transform",
    "name_leaf",
    "rnn_group_for",
    "snake_case",
    "spec_for_class",
    "spec_for_mro",
    "spec_for_snake",
]


def snake_case(name: str) -> str:
    """Keras' ``naming.to_snake_case`` (class name -> container key / auto-name base)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


# ------------------------------------------------------------------------------- one-to-one rules


def _conv_perm(rank: int) -> tuple[int, ...]:
    """Keras [*spatial, in, out] -> torch [out, in, *spatial]."""
    return (rank - 1, rank - 2, *range(rank - 2))


def einsum_kernel_transform(shape: Sequence[int], in_axes: Sequence[int]) -> Transform | None:
    """EinsumDense kernel -> a Linear weight ``[prod(out axes), prod(in axes)]``.

    ``in_axes`` are the kernel axes contracted with the input; the others are output axes.
    """
    shape = tuple(int(d) for d in shape)
    ins = tuple(int(a) % len(shape) for a in in_axes) if shape else ()
    outs = tuple(a for a in range(len(shape)) if a not in ins)
    if not ins or not outs:
        return None
    if len(shape) == 2:
        return Transform(perm=(1, 0)) if ins == (0,) else None
    flat = (math.prod(shape[a] for a in outs), math.prod(shape[a] for a in ins))
    return Transform(perm=(*outs, *ins), reshape=flat, in_shape=shape)


def _flatten(shape: Sequence[int]) -> Transform | None:
    """A rank > 1 vector-like tensor (EinsumDense bias) -> its flat form."""
    shape = tuple(int(d) for d in shape)
    return Transform(reshape=(math.prod(shape),), in_shape=shape) if len(shape) > 1 else None


def _depthwise(shape: Sequence[int]) -> Transform | None:
    """Keras depthwise ``[*k, in, mult]`` -> torch grouped conv ``[in*mult, 1, *k]``."""
    shape = tuple(int(d) for d in shape)
    r = len(shape)
    perm = (r - 2, r - 1, *range(r - 2))
    return Transform(perm=perm, reshape=(shape[-2] * shape[-1], 1, *shape[:-2]), in_shape=shape)


def _prelu(shape: Sequence[int]) -> Transform | None:
    """PReLU ``alpha`` shared over every axis but the last -> torch ``PReLU.weight`` ``[C]``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) > 1 and all(d == 1 for d in shape[:-1]):
        return Transform(reshape=(shape[-1],), in_shape=shape)
    return None


# A leaf rule: (canonical leaf, rule name, Keras shape + layer facts -> keras->canonical Transform or None).
LeafRule = tuple[str, str | None, Callable[[Sequence[int], Mapping[str, Any]], Transform | None] | None]

_KERNEL_T: LeafRule = ("weight", "dense-kernel", lambda s, f: Transform(perm=(1, 0)) if len(s) == 2 else None)
_CONV_K: LeafRule = ("weight", "conv-kernel", lambda s, f: Transform(perm=_conv_perm(len(s))) if len(s) >= 3 else None)
_BIAS: LeafRule = ("bias", "bias", None)
_GAMMA: LeafRule = ("weight", "norm-gamma", None)
_BETA: LeafRule = ("bias", "norm-beta", None)


def leaf_transform(rule: LeafRule, shape: Sequence[int], facts: Mapping[str, Any]) -> Transform | None:
    """The keras -> canonical transform of one leaf rule for a variable of ``shape``."""
    fn = rule[2]
    return fn(shape, facts) if fn is not None else None


# Rules whose transform is the whole point: when it cannot be built (an EinsumDense kernel whose equation a
# file does not carry, a PReLU alpha not shared over the spatial axes), the variable keeps its Keras name.
_NEEDS_TRANSFORM = frozenset({"dense-kernel", "conv-kernel", "einsum-kernel", "prelu-alpha"})


def name_leaf(spec: LayerSpec | None, leaf: str, shape: Sequence[int], facts: Mapping[str, Any]
              ) -> tuple[str, Transform | None, str | None]:
    """Canonical leaf, keras -> canonical transform and rule name of one variable of a layer of ``spec``.

    Both the adapter (live layer) and the ``.weights.h5`` reader (file) call this, so they name alike.
    """
    rule = spec.leaves.get(leaf) if spec is not None else None
    if rule is None:
        return leaf, None, None
    fwd = leaf_transform(rule, shape, facts)
    if fwd is None and rule[1] in _NEEDS_TRANSFORM:
        return leaf, None, None
    return rule[0], fwd, rule[1] if (fwd is not None or rule[0] != leaf) else None


# ------------------------------------------------------------------------------------ group rules


class GroupRule:
    """An N-to-M conversion of one layer's variables (Keras leaves <-> canonical leaves).

    Subclasses set ``name`` and implement the four methods; arrays are numpy arrays.
    """

    name = "group"

    def keras_leaves(self) -> tuple[str, ...]:
        """The Keras leaves the rule consumes (all of them must be present)."""
        raise NotImplementedError

    def canonical_shapes(self, keras_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Canonical leaf -> shape."""
        raise NotImplementedError

    def to_canonical(self, keras: Mapping[str, Any]) -> dict[str, Any]:
        """Keras leaf arrays -> canonical leaf arrays."""
        raise NotImplementedError

    def to_keras(self, canonical: Mapping[str, Any], keras_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Canonical leaf arrays -> Keras leaf arrays."""
        raise NotImplementedError


@dataclass(frozen=True)
class RNNGroup(GroupRule):
    """A Keras RNN cell (LSTMCell, GRUCell, SimpleRNNCell) <-> one direction of ``nn.LSTM``/``GRU``/``RNN``.

    Keras keeps ``kernel [in, G*u]``, ``recurrent_kernel [u, G*u]`` and one ``bias``; torch keeps
    ``weight_ih_l0 [G*u, in]``, ``weight_hh_l0 [G*u, u]`` and two biases. Gate blocks are reordered by
    ``gate_order`` (torch block i = Keras block ``gate_order[i]``): LSTM i,f,c,o = torch i,f,g,o; GRU z,r,h
    -> torch r,z,n. A single Keras bias becomes ``bias_ih`` with a zero ``bias_hh`` (torch adds both); back,
    the two are summed, so the layer computes the same numbers both ways. A GRU with ``reset_after=True``
    has two biases (input, recurrent) and maps one to one.

    Attributes:
        gates: Gate count G.
        gate_order: torch block -> Keras block.
        suffix: ``""`` or ``"_reverse"`` (the backward layer of a Bidirectional).
        two_biases: The Keras bias is ``[2, G*u]`` (GRU ``reset_after=True``).
    """

    gates: int
    gate_order: tuple[int, ...]
    suffix: str = ""
    two_biases: bool = False
    name: str = "rnn-cell"

    def keras_leaves(self) -> tuple[str, ...]:
        return ("kernel", "recurrent_kernel")

    def _names(self) -> tuple[str, str, str, str]:
        s = self.suffix
        return f"weight_ih_l0{s}", f"weight_hh_l0{s}", f"bias_ih_l0{s}", f"bias_hh_l0{s}"

    def canonical_shapes(self, keras_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        w_ih, w_hh, b_ih, b_hh = self._names()
        n_in, gu = keras_shapes["kernel"]
        out = {w_ih: (gu, n_in), w_hh: (gu, keras_shapes["recurrent_kernel"][0])}
        if "bias" in keras_shapes:
            out[b_ih] = out[b_hh] = (gu,)
        return out

    def _reorder(self, arr: Any, axis: int, inverse: bool = False) -> Any:
        import numpy as np

        blocks = np.split(arr, self.gates, axis=axis)
        order = self.gate_order
        if inverse:
            order = tuple(order.index(i) for i in range(self.gates))
        return np.concatenate([blocks[i] for i in order], axis=axis)

    def to_canonical(self, keras: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        w_ih, w_hh, b_ih, b_hh = self._names()
        out = {w_ih: self._reorder(np.asarray(keras["kernel"]), 1).T,
               w_hh: self._reorder(np.asarray(keras["recurrent_kernel"]), 1).T}
        if "bias" in keras:
            bias = np.asarray(keras["bias"])
            if self.two_biases:
                out[b_ih], out[b_hh] = self._reorder(bias[0], 0), self._reorder(bias[1], 0)
            else:
                out[b_ih], out[b_hh] = self._reorder(bias, 0), np.zeros_like(bias)
        return out

    def to_keras(self, canonical: Mapping[str, Any], keras_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        import numpy as np

        w_ih, w_hh, b_ih, b_hh = self._names()
        out = {"kernel": self._reorder(np.asarray(canonical[w_ih]).T, 1, inverse=True),
               "recurrent_kernel": self._reorder(np.asarray(canonical[w_hh]).T, 1, inverse=True)}
        if "bias" in keras_shapes:
            bi, bh = np.asarray(canonical[b_ih]), np.asarray(canonical[b_hh])
            if self.two_biases:
                out["bias"] = np.stack([self._reorder(bi, 0, True), self._reorder(bh, 0, True)])
            else:
                out["bias"] = self._reorder(bi + bh, 0, inverse=True)
        return out


_CELL_GATES = {"LSTMCell": (4, (0, 1, 2, 3)), "GRUCell": (3, (1, 0, 2)), "SimpleRNNCell": (1, (0,))}


def rnn_group_for(cell_class: str, path: Sequence[str], keras_shapes: Mapping[str, tuple[int, ...]]
                  ) -> tuple[RNNGroup, tuple[str, ...]] | None:
    """The group rule of an RNN cell at ``path`` (segments), and the canonical module path it names.

    ``lstm/cell`` -> ``lstm``; a Bidirectional's ``bi/forward_layer/cell`` -> ``bi`` and
    ``bi/backward_layer/cell`` -> ``bi`` with the ``_reverse`` suffix, as ``nn.LSTM(bidirectional=True)``.
    A GRU without ``reset_after`` (bias ``[3u]`` applied before the reset gate) has no torch equivalent:
    None, so its variables keep their Keras names.
    """
    if cell_class not in _CELL_GATES or "kernel" not in keras_shapes or "recurrent_kernel" not in keras_shapes:
        return None
    gates, order = _CELL_GATES[cell_class]
    bias = keras_shapes.get("bias")
    two = bias is not None and len(bias) == 2
    if cell_class == "GRUCell" and bias is not None and not two:
        return None
    path = tuple(path)
    prefix, suffix = path, ""
    if path and path[-1] == "cell":
        prefix = path[:-1]
    if prefix and prefix[-1] in ("forward_layer", "backward_layer"):
        suffix = "_reverse" if prefix[-1] == "backward_layer" else ""
        prefix = prefix[:-1]
    return RNNGroup(gates, order, suffix, two, f"{snake_case(cell_class).replace('_cell', '')}-cell"), prefix


# ------------------------------------------------------------------------------------ structural names


def _auto_named(key: str, name: str) -> bool:
    """True when ``name`` looks auto-generated for a layer whose container key is ``key``."""
    base = re.sub(r"_\d+$", "", key)
    return bool(re.fullmatch(rf"{re.escape(base)}(_\d+)?", name))


def functional_segments(entries: list[tuple[str, str | None]]) -> list[str]:
    """Canonical segments of a functional model's layers from (container key, stored name) pairs.

    A layer keeps its name unless the name looks auto-generated (then its container key); when that makes
    two segments equal, the whole container uses container keys. The ``.weights.h5`` reader uses the same
    function on the same facts, so both sides agree.
    """
    segs = [name if name and not _auto_named(key, name) else key for key, name in entries]
    if len(set(segs)) != len(segs):
        return [key for key, _ in entries]
    return segs


def container_segments(keys: list[str]) -> list[str]:
    """Canonical segments of a dict's entries (or a list's, as a file shows them) from their container keys.

    Keras saves a dict as the list of its values with class-name counters (``dense``, ``dense_1``): positions
    when every entry has one class (the counters then count positions), else the counters themselves.
    """
    if keys:
        base = keys[0]
        if keys == [base] + [f"{base}_{i}" for i in range(1, len(keys))]:
            return [str(i) for i in range(len(keys))]
    return list(keys)


# ----------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LayerSpec:
    """What hubload knows about one Keras layer class.

    Attributes:
        keras_class: The Keras class name ("Dense"); subclasses use the nearest spec in their MRO. The
            behaviour check keys its per-class attribute table by this name too.
        variables: Variable names in creation order (``vars/0`` ... in a ``.weights.h5``); a trailing
            optional variable (``bias`` with ``use_bias=False``) may be absent.
        leaves: Keras leaf -> (canonical leaf, rule name, transform builder).
        children: Attribute -> (child class, facts) for sublayers whose class a file cannot tell.
        group: True for cells converted as a group (:func:`rnn_group_for`).
        after_load: Method to call once the layer's variables are assigned (``Normalization`` caches its
            mean/variance in ``finalize_state``, as its own ``load_own_variables`` does).
        path_rules: Keras leaf -> the :data:`hubload.layout.KERAS_RULES` row to use when only a variable's path,
            shape and this class are known (a TF checkpoint, a Keras-layout safetensors): Keras 3 calls a
            DepthwiseConv2D kernel plain ``kernel``, which leaf and rank alone would take for a Conv2D's.
    """

    keras_class: str
    variables: tuple[str, ...]
    leaves: Mapping[str, LeafRule] = field(default_factory=dict)
    children: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    group: bool = False
    after_load: str | None = None
    path_rules: Mapping[str, str] = field(default_factory=dict)


def _einsum_kernel(shape: Sequence[int], facts: Mapping[str, Any]) -> Transform | None:
    in_axes = facts.get("in_axes")
    if in_axes is None and facts.get("n_in") is not None:
        n_in = int(facts["n_in"]) % len(shape)
        in_axes = tuple(range(n_in))
    if in_axes is None and len(shape) == 2:
        in_axes = (0,)
    return einsum_kernel_transform(shape, in_axes) if in_axes is not None else None


_CONV = {"kernel": _CONV_K, "bias": _BIAS}
_NORM = {"gamma": _GAMMA, "beta": _BETA}
_SEPARABLE = {"depthwise_kernel": ("depthwise.weight", "depthwise-kernel", lambda s, f: _depthwise(s)),
              "pointwise_kernel": ("pointwise.weight", "conv-kernel", lambda s, f: Transform(perm=_conv_perm(len(s)))),
              "bias": ("pointwise.bias", "bias", None)}
_QKV = ("EinsumDense", {"n_in": 1})

KERAS_LAYER_SPECS: dict[str, LayerSpec] = {s.keras_class: s for s in (
    LayerSpec("Dense", ("kernel", "bias"), {"kernel": _KERNEL_T, "bias": _BIAS}),
    LayerSpec("EinsumDense", ("kernel", "bias"),
              {"kernel": ("weight", "einsum-kernel", _einsum_kernel),
               "bias": ("bias", "einsum-bias", lambda s, f: _flatten(s))}),
    LayerSpec("Embedding", ("embeddings",), {"embeddings": ("weight", "embedding", None)}),
    *(LayerSpec(c, ("kernel", "bias"), _CONV) for c in ("Conv1D", "Conv2D", "Conv3D")),
    *(LayerSpec(f"Conv{d}DTranspose", ("kernel", "bias"), _CONV, path_rules={"kernel": f"conv{d}d-transpose-kernel"})
      for d in (1, 2, 3)),
    *(LayerSpec(f"DepthwiseConv{d}D", ("kernel", "bias"),
                {"kernel": ("weight", "depthwise-kernel", lambda s, f: _depthwise(s)), "bias": _BIAS},
                path_rules={"kernel": f"depthwise-conv{d}d-kernel"}) for d in (1, 2)),
    *(LayerSpec(c, ("depthwise_kernel", "pointwise_kernel", "bias"), _SEPARABLE)
      for c in ("SeparableConv1D", "SeparableConv2D")),
    LayerSpec("BatchNormalization", ("gamma", "beta", "moving_mean", "moving_variance"),
              {**_NORM, "moving_mean": ("running_mean", "bn-moving-mean", None),
               "moving_variance": ("running_var", "bn-moving-variance", None)}),
    LayerSpec("LayerNormalization", ("gamma", "beta"), _NORM),
    LayerSpec("GroupNormalization", ("gamma", "beta"), _NORM),
    LayerSpec("RMSNormalization", ("scale",), {"scale": ("weight", "rms-scale", None)}),
    LayerSpec("PReLU", ("alpha",), {"alpha": ("weight", "prelu-alpha", lambda s, f: _prelu(s))}),
    LayerSpec("Normalization", ("mean", "variance", "count"),
              {"mean": ("mean", None, None), "variance": ("variance", None, None), "count": ("count", None, None)},
              after_load="finalize_state"),
    LayerSpec("MultiHeadAttention", (), children={"query_dense": _QKV, "key_dense": _QKV, "value_dense": _QKV,
                                                  "output_dense": ("EinsumDense", {"n_in": -1})}),
    LayerSpec("LSTMCell", ("kernel", "recurrent_kernel", "bias"), group=True),
    LayerSpec("GRUCell", ("kernel", "recurrent_kernel", "bias"), group=True),
    LayerSpec("SimpleRNNCell", ("kernel", "recurrent_kernel", "bias"), group=True),
    *(LayerSpec(c, (), children={"cell": (c + "Cell", {})}) for c in ("LSTM", "GRU", "SimpleRNN")),
)}

_BY_SNAKE = {snake_case(c): s for c, s in KERAS_LAYER_SPECS.items()}
# Keras' own snake names differ from snake_case for a few classes' auto names ("conv2d" for Conv2D).
_BY_SNAKE.update({"conv1d": KERAS_LAYER_SPECS["Conv1D"], "conv2d": KERAS_LAYER_SPECS["Conv2D"],
                  "conv3d": KERAS_LAYER_SPECS["Conv3D"]})


def spec_for_class(name: str | None) -> LayerSpec | None:
    """The spec of a Keras class name, if the table has one."""
    return KERAS_LAYER_SPECS.get(name or "")


def spec_for_mro(class_names: Sequence[str]) -> LayerSpec | None:
    """The spec of the nearest class of an MRO (subclasses of Dense, Conv2D ... use their base's spec)."""
    for n in class_names:
        if n in KERAS_LAYER_SPECS:
            return KERAS_LAYER_SPECS[n]
    return None


def spec_for_snake(key: str | None) -> LayerSpec | None:
    """The spec for a container key or an auto-generated layer name (``conv2d_3`` -> Conv2D)."""
    if not key:
        return None
    if key in _BY_SNAKE:
        return _BY_SNAKE[key]
    base = re.sub(r"_\d+$", "", key)
    return _BY_SNAKE.get(base)
