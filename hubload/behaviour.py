"""What a model computes, beyond its tensor names and shapes: layer descriptors, their comparison, numeric checks.

Two models whose parameters line up by name and shape can still compute different things (ReLU vs tanh,
TF ``'same'`` vs torch ``padding=1`` at stride 2, a Keras Flatten of an NHWC map before a Dense, BatchNorm
epsilon 1e-3 vs 1e-5, ...). This module is the framework-free half of hubload's answer:

* :class:`LayerDesc` — one layer (keyed by the canonical prefix its weights share, e.g. ``encoder.0.dense``)
  described in a normalised, framework-neutral vocabulary: kind (``dense``, ``conv2d``, ``batchnorm`` ...),
  the attributes that change the numbers (stride, normalised padding, dilation, groups, use_bias, eps, RNN
  activations ...), the activation applied to its output and the pooling that follows it. The adapters
  (``hubload.adapters.torch_behaviour`` / ``keras_behaviour``) fill them from module/layer attributes and
  from a *recorded call* (every layer's input and output on one probe input), so an activation called
  functionally in ``forward``/``call`` is seen too: :func:`analyse` identifies it numerically.
* :func:`compare` — the differences between a reference model's layers and the target's, paired by the
  compat report (each target tensor's canonical prefix and the reference tensor filling it).
* :func:`trap_warnings` — with no reference: the cross-framework traps the target model itself reveals.
* :func:`flatten_fixes` — a Dense/Linear fed by a flattened feature map whose channel order differs between
  the checkpoint's producer and the target: the kernel's input columns are permuted at load time.
* :class:`Verification`, :func:`tolerance`, :func:`max_abs_diff`, :func:`first_divergent` — numeric
  verification and the layer where two runs part ways (in :mod:`hubload.divergence`, re-exported here).

numpy is imported lazily (``import hubload`` imports no numpy).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hubload.errors import IncompatibleWeightsError
from hubload.layout import Transform

__all__ = [
    "Difference",
    "Event",
    "LayerDesc",
    "Verification",
    "analyse",
    "compare",
    "first_divergent",
    "flatten_fixes",
    "max_abs_diff",
    "pad_spec",
    "render_padding",
    "tolerance",
    "trap_warnings",
]

log = logging.getLogger("hubload")

# Keras' BatchNormalization / LayerNormalization default epsilon, and PyTorch's.
KERAS_DEFAULT_EPS = 1e-3
TORCH_DEFAULT_EPS = 1e-5

# Attributes whose values differ by framework convention only and are not compared.
_NOT_COMPARED = frozenset({"flatten_of", "data_format", "layout", "tf_padding"})


# ---------------------------------------------------------------------------------------- descriptors


@dataclass
class LayerDesc:
    """One layer, described in hubload's framework-neutral vocabulary.

    Attributes:
        name: The canonical prefix its weights share (``dense1``, ``encoder.layer.0.output.dense``).
        kind: ``dense``, ``conv1d``/``conv2d``/``conv3d``, ``conv_transpose2d``, ``batchnorm``, ``layernorm``,
            ``groupnorm``, ``embedding``, ``lstm``, ``gru``, ``rnn``, ``mha``, or the class name.
        cls: The framework class (``Linear``, ``Conv2D`` ...), for messages.
        framework: ``torch`` or ``tf``.
        attrs: Attributes that change the numbers (normalised values, comparable across frameworks).
        own_act: Activation the layer applies itself (Keras ``Dense(activation=...)``), ``linear`` if none.
        act: Candidate names of the elementwise function applied to its output before the next layer (found
            numerically in a recorded call, e.g. ``{"relu"}``); empty when unknown or not recorded.
        pools: Pooling kinds (``max``/``avg``) between this layer and the next one with weights, or None when
            not recorded.
        order: Position in the recorded call (None when not recorded).
    """

    name: str
    kind: str
    cls: str
    framework: str
    attrs: dict[str, Any] = field(default_factory=dict)
    own_act: str = "linear"
    act: frozenset[str] = frozenset()
    pools: tuple[str, ...] | None = None
    order: int | None = None

    def activation(self) -> str:
        """The activation after this layer, as one readable string (``relu``, ``linear``, ``?``)."""
        parts = [] if self.own_act in ("linear", "identity") else [self.own_act]
        if self.act and "identity" not in self.act:
            parts.append(next(n for n in _candidates() if n in self.act))
        elif not self.act and self.order is not None:
            parts.append("?")
        return " then ".join(parts) or "linear"


@dataclass
class Event:
    """One layer call recorded during a run (the adapters build these).

    Attributes:
        label: The layer's name for messages (canonical prefix, or the framework's own name).
        key: The canonical prefix when the layer owns weights, else None.
        kind: Normalised kind (as in :class:`LayerDesc`), or ``activation``/``pool``/``flatten``/``pad``/
            ``dropout``/``other`` for layers without weights.
        parent: Index of the enclosing recorded call (nested layers), or None.
        inp: The first positional input (numpy), in the framework's own layout.
        out: The first output (numpy).
        attrs: For layers without weights: ``act`` (name), ``pool`` (``max``/``avg``), ``pads`` ...
        channels_last: The input is channels-last (convert to compare with the canonical NCHW).
    """

    label: str
    key: str | None
    kind: str
    parent: int | None
    inp: Any
    out: Any
    attrs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False


@dataclass(frozen=True)
class Difference:
    """A behaviour difference between a reference layer and the target layer it fills.

    Attributes:
        layer: The target's layer (canonical prefix).
        attribute: What differs (``activation``, ``padding``, ``eps``, ``kind`` ...).
        reference: The reference's value, as text.
        target: The target's value, as text.
        reference_layer: The reference's layer (canonical prefix), when it is named differently.
    """

    layer: str
    attribute: str
    reference: str
    target: str
    reference_layer: str = ""

    def message(self) -> str:
        """One line naming the layer and both values."""
        where = self.layer if not self.reference_layer or self.reference_layer == self.layer else \
            f"{self.layer} (reference {self.reference_layer})"
        return f"{where}: {self.attribute} is {self.reference} in the reference, {self.target} in the target"


# -------------------------------------------------------------------------------------------- padding

_RESIDUE_BASE = 16  # padding is evaluated for input sizes 16*stride + r, one per residue r of the stride


def pad_spec(mode: str, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
             pads: Sequence[tuple[int, int]] | None = None) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Normalised padding: per spatial dim, the (before, after) pads for each input size residue mod stride.

    TF's ``'same'`` pads ``max((ceil(n/s)-1)*s + d*(k-1) + 1 - n, 0)`` in total, the smaller half before:
    asymmetric, and dependent on the input size when the stride is above 1. PyTorch pads a fixed amount on
    both sides (``'same'`` is stride 1 only). Two convolutions pad alike when these tuples are equal.

    Args:
        mode: ``explicit`` (``pads`` given), ``valid`` or ``same``.
        kernel: Kernel size per spatial dim.
        stride: Stride per spatial dim.
        dilation: Dilation per spatial dim.
        pads: (before, after) per spatial dim for ``explicit``.

    Returns:
        A hashable tuple, comparable across frameworks.
    """
    out = []
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        per = []
        for r in range(max(int(s), 1)):
            n = _RESIDUE_BASE * max(int(s), 1) + r
            if mode == "explicit":
                per.append((int(pads[i][0]), int(pads[i][1])) if pads else (0, 0))
            elif mode == "valid":
                per.append((0, 0))
            else:
                total = max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
                per.append((total // 2, total - total // 2))
        out.append(tuple(per))
    return tuple(out)


def add_padding(spec: tuple[tuple[tuple[int, int], ...], ...], pads: Sequence[tuple[int, int]]
                ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``spec`` with an explicit zero padding done before the layer added in (Keras ZeroPadding + conv)."""
    return tuple(tuple((b + int(pads[i][0]), a + int(pads[i][1])) for b, a in dim) for i, dim in enumerate(spec))


def render_padding(spec: Any) -> str:
    """Readable form of :func:`pad_spec` output: ``(1, 1)`` or ``(0, 1) on even sizes, (1, 1) on odd``."""
    if not isinstance(spec, tuple):
        return str(spec)
    dims = []
    for dim in spec:
        if len(set(dim)) == 1:
            dims.append(str(dim[0]))
        elif len(dim) == 2:
            dims.append(f"{dim[0]} on even sizes, {dim[1]} on odd")
        else:
            dims.append(", ".join(f"{p} when size % {len(dim)} == {r}" for r, p in enumerate(dim)))
    return "[" + "; ".join(dims) + "]"


# ------------------------------------------------------------------------------------------ activations


def _erf(x: Any) -> Any:
    """Elementwise erf, vectorised (Abramowitz & Stegun 7.1.26: |error| < 1.5e-7, far below the tolerance)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _candidates() -> dict[str, Callable[[Any], Any]]:
    """Elementwise (and softmax) functions an activation is identified among, in float64."""
    import numpy as np

    def softmax(x: Any, axis: int) -> Any:
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    return {
        "identity": lambda x: x,
        "relu": lambda x: np.maximum(x, 0),
        "relu6": lambda x: np.clip(x, 0, 6),
        "leaky_relu(0.01)": lambda x: np.where(x > 0, x, 0.01 * x),
        "leaky_relu(0.2)": lambda x: np.where(x > 0, x, 0.2 * x),
        "leaky_relu(0.3)": lambda x: np.where(x > 0, x, 0.3 * x),
        "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
        "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(np.minimum(x, 0))),
        "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
        "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        "silu": lambda x: x / (1 + np.exp(-x)),
        "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "tanh": np.tanh,
        "softplus": lambda x: np.logaddexp(0, x),
        "softsign": lambda x: x / (1 + np.abs(x)),
        "softmax": lambda x: softmax(x, -1),
        "softmax(axis=1)": lambda x: softmax(x, 1) if x.ndim > 2 else softmax(x, -1),
        "log_softmax": lambda x: np.log(softmax(x, -1)),
    }


def identify(y: Any, x: Any, dtype: str = "float32") -> frozenset[str]:
    """Names of the functions ``f`` with ``x ≈ f(y)`` (a flatten in between is allowed); empty if none.

    ``y`` is a layer's output, ``x`` the input of the next recorded layer (or the model output).
    """
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if y.size != x.size or y.size == 0 or y.shape[:1] != x.shape[:1]:
        return frozenset()
    if y.shape != x.shape:
        y = y.reshape(x.shape)  # a flatten keeps memory order in both frameworks
    tol = tolerance(dtype) * max(1.0, float(np.abs(x).max()))
    errors: dict[str, float] = {}
    with np.errstate(all="ignore"):
        for name, f in _candidates().items():
            fy = f(y)
            if fy.shape == x.shape:
                err = float(np.nanmax(np.abs(fy - x))) if np.isfinite(fy).all() else math.inf
                errors[name] = err
    # On inputs where several functions agree (all inputs > 0: relu == identity) all are kept: the
    # comparison only reports two sets that do not meet.
    return frozenset(n for n, e in errors.items() if e <= tol)


# ----------------------------------------------------------------------------------------- analysis

_TRANSPARENT = frozenset({"activation", "dropout", "identity"})


def _descends(events: Sequence[Event], j: int, i: int) -> bool:
    """True if event ``j`` ran inside event ``i``."""
    p = events[j].parent
    while p is not None:
        if p == i:
            return True
        p = events[p].parent
    return False


def analyse(descs: dict[str, LayerDesc], events: Sequence[Event], output: Any, dtype: str = "float32") -> None:
    """Fill each descriptor's recorded facts from one recorded call (in place).

    For every layer with weights: its position in the call, the elementwise function between its output
    and the input of the next layer that does not run inside it (or the model output), the pooling layers
    before the next layer with weights, zero padding folded into the convolution it feeds, and for a
    Dense/Linear fed by a flattened feature map, that map's shape and channel order (``flatten_of``).
    """
    seen: set[str] = set()
    for i, ev in enumerate(events):
        if ev.key is None or ev.key not in descs or ev.key in seen:
            continue
        seen.add(ev.key)
        desc = descs[ev.key]
        desc.order = i
        nxt = None
        pools: list[str] = []
        for j in range(i + 1, len(events)):
            if _descends(events, j, i):
                continue
            e = events[j]
            if e.kind in _TRANSPARENT:
                continue
            if nxt is None:
                nxt = e
            if e.kind == "pool":
                pools.append(e.attrs.get("pool", "?"))
                continue
            if e.key is not None:
                break
        target = nxt.inp if nxt is not None else output
        desc.act = identify(ev.out, target, dtype) if target is not None else frozenset()
        desc.pools = tuple(pools)
    # Zero padding that feeds a convolution (Keras ZeroPadding2D + Conv2D 'valid') is that conv's padding:
    # either the conv pads its own input (the pad runs inside it) or the next layer is the conv.
    def is_conv(ev: Event | None) -> bool:
        return ev is not None and ev.key in descs and descs[ev.key].kind.startswith("conv") and \
            "padding" in descs[ev.key].attrs

    for i, ev in enumerate(events):
        if ev.kind != "pad" or "pads" not in ev.attrs:
            continue
        conv = events[ev.parent] if ev.parent is not None and is_conv(events[ev.parent]) else None
        if conv is None:
            nxt = next((e for e in events[i + 1:] if e.parent == ev.parent), None)
            if is_conv(nxt) and getattr(nxt.inp, "shape", None) == getattr(ev.out, "shape", None):
                conv = nxt
        if conv is not None and not descs[conv.key].attrs.get("_pad_folded"):
            desc = descs[conv.key]
            desc.attrs["padding"] = add_padding(desc.attrs["padding"], ev.attrs["pads"])
            desc.attrs["_pad_folded"] = True
    for d in descs.values():
        d.attrs.pop("_pad_folded", None)
    # A Dense/Linear whose input is a flattened feature map (rank >= 3 output of an earlier layer).
    for i, ev in enumerate(events):
        if ev.key not in descs or descs[ev.key].kind != "dense":
            continue
        inp = ev.inp
        if getattr(inp, "ndim", 0) != 2:
            continue
        for j in range(i - 1, -1, -1):
            if _descends(events, i, j):
                continue
            prev = events[j]
            out = prev.out
            if getattr(out, "ndim", 0) >= 3 and out.shape[0] == inp.shape[0] and \
                    math.prod(out.shape[1:]) == inp.shape[1]:
                per_sample = tuple(int(d) for d in out.shape[1:])
                if prev.kind == "flatten" and getattr(prev.inp, "ndim", 0) >= 3:
                    per_sample = tuple(int(d) for d in prev.inp.shape[1:])
                order = "channels_last" if (prev.channels_last or prev.attrs.get("channels_last")) else \
                    "channels_first"
                descs[ev.key].attrs["flatten_of"] = (per_sample, order)
                break
            if prev.key is not None and prev.kind not in _TRANSPARENT:
                break


# ----------------------------------------------------------------------------------------- comparison


def _fmt(value: Any, attr: str) -> str:
    """A value as shown in a difference."""
    if attr == "padding":
        return render_padding(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _equal(a: Any, b: Any) -> bool:
    """Attribute equality (floats by relative closeness: eps 1e-5 written as 1.0000001e-05 is equal)."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def compare(reference: Mapping[str, LayerDesc], target: Mapping[str, LayerDesc],
            pairs: Iterable[tuple[str, str]]) -> list[Difference]:
    """The behaviour differences between paired layers.

    Args:
        reference: The reference model's descriptors (canonical prefix -> desc).
        target: The target model's descriptors.
        pairs: ``(target prefix, reference prefix)`` pairs, from the compat report's matched tensors.

    Returns:
        One :class:`Difference` per differing attribute, in the target's layer order.
    """
    diffs: list[Difference] = []
    done: set[tuple[str, str]] = set()
    ordered = sorted(set(pairs), key=lambda p: (target[p[0]].order if p[0] in target and
                                                target[p[0]].order is not None else 1 << 30, p[0]))
    for t_name, r_name in ordered:
        if (t_name, r_name) in done or t_name not in target or r_name not in reference:
            continue
        done.add((t_name, r_name))
        t, r = target[t_name], reference[r_name]
        rl = r_name if r_name != t_name else ""

        def add(attr: str, rv: Any, tv: Any) -> None:
            diffs.append(Difference(t_name, attr, _fmt(rv, attr), _fmt(tv, attr), rl))

        if t.kind != r.kind:
            add("layer type", f"{r.kind} ({r.cls})", f"{t.kind} ({t.cls})")
            continue
        for attr in sorted(set(t.attrs) & set(r.attrs) - _NOT_COMPARED):
            tv, rv = t.attrs[attr], r.attrs[attr]
            if tv is None or rv is None:
                continue
            if not _equal(rv, tv):
                add(attr, rv, tv)
        # The activation after the layer: its own, then the recorded function up to the next layer.
        t_own = "linear" if t.own_act in ("identity",) else t.own_act
        r_own = "linear" if r.own_act in ("identity",) else r.own_act
        t_total = _total_act(t_own, t.act)
        r_total = _total_act(r_own, r.act)
        if t_total is not None and r_total is not None and not (t_total & r_total):
            add("activation", r.activation(), t.activation())
        if t.pools is not None and r.pools is not None and t.pools != r.pools:
            add("pooling after it", ", ".join(r.pools) or "none", ", ".join(t.pools) or "none")
    return diffs


def _total_act(own: str, recorded: frozenset[str]) -> frozenset[str] | None:
    """Candidate names of the whole function after a layer (own activation, then the recorded one).

    None when unknown (not recorded, or no candidate matched): then nothing is claimed.
    """
    if not recorded or own == "?":
        return None
    if own == "linear":
        return recorded
    if "identity" in recorded:
        return frozenset({own})
    return None  # an own activation followed by another function: too rare to name, verification decides


# ------------------------------------------------------------------------------------ no-reference traps


def trap_warnings(target: Mapping[str, LayerDesc], checkpoint_layout: str | None) -> list[str]:
    """Known cross-framework traps the target model reveals, when no reference exists to compare with.

    Only Keras targets under torch-layout weights: TF ``'same'`` padding at stride > 1 (asymmetric), and
    Keras' default BatchNormalization/LayerNormalization epsilon 1e-3 (PyTorch's is 1e-5).

    Args:
        target: The target's descriptors.
        checkpoint_layout: ``torch`` or ``keras`` (the checkpoint's tensor convention).

    Returns:
        Messages, each naming the layer.
    """
    if checkpoint_layout != "torch":
        return []
    out = []
    for name, d in target.items():
        if d.framework != "tf":
            continue
        if d.kind.startswith("conv") and d.attrs.get("tf_padding") == "same" and \
                any(s > 1 for s in d.attrs.get("stride", ())):
            out.append(f"{name} ({d.cls}): padding='same' with stride {tuple(d.attrs['stride'])} pads "
                       "asymmetrically (0 before, 1 after on even sizes); a PyTorch padding=k//2 pads both sides "
                       "alike, so torch-trained weights give different numbers. Use ZeroPadding2D + "
                       "padding='valid' to match torch")
        if d.kind in ("batchnorm", "layernorm") and _equal(d.attrs.get("eps"), KERAS_DEFAULT_EPS):
            out.append(f"{name} ({d.cls}): epsilon={KERAS_DEFAULT_EPS:g} is Keras' default; PyTorch's "
                       f"{'BatchNorm' if d.kind == 'batchnorm' else 'LayerNorm'} default is {TORCH_DEFAULT_EPS:g}, "
                       "so torch-trained weights give different numbers unless the model was trained with 1e-3. "
                       f"Build it with epsilon={TORCH_DEFAULT_EPS:g} if the weights come from torch")
    return out


# ---------------------------------------------------------------------------------------- flatten fix


def _flatten_perm(kind: str, ckpt_layout_transform: Transform | None, out_features: int, spatial: tuple[int, ...],
                  channels: int, src_order: str, dst_order: str) -> Transform | None:
    """A checkpoint-native -> canonical transform that also reorders a Linear weight's input columns."""
    def dims(order: str) -> list[str]:
        names = [f"s{i}" for i in range(len(spatial))]
        return names + ["c"] if order == "channels_last" else ["c"] + names

    sizes = {"o": out_features, "c": channels, **{f"s{i}": n for i, n in enumerate(spatial)}}
    src = dims(src_order)
    dst = ["o"] + dims(dst_order)
    if ckpt_layout_transform is None or ckpt_layout_transform.is_identity:
        axes = ["o"] + src  # canonical [out, in] already
    elif ckpt_layout_transform.perm == (1, 0) and ckpt_layout_transform.reshape is None \
            and ckpt_layout_transform.pre_reshape is None:
        axes = src + ["o"]  # a Keras kernel [in, out]
    else:
        return None
    perm = tuple(axes.index(a) for a in dst)
    in_shape = (sizes["o"], math.prod(sizes[a] for a in src)) if axes[0] == "o" else \
        (math.prod(sizes[a] for a in src), sizes["o"])
    return Transform(perm=perm, pre_reshape=tuple(sizes[a] for a in axes),
                     reshape=(sizes["o"], math.prod(sizes[a] for a in dst[1:])), in_shape=in_shape)


def flatten_fixes(report: Any, target: Mapping[str, LayerDesc], source_order: Callable[[str], str | None]
                  ) -> list[str]:
    """Re-order the input columns of Dense/Linear weights fed by a flattened feature map (in place).

    A PyTorch model flattens NCHW maps as (C, H, W), a Keras one NHWC maps as (H, W, C). Loading such a
    Dense kernel across frameworks as it is gives silently wrong numbers (the classic port bug), so its
    columns are permuted to the target's order while it is copied.

    Args:
        report: The CompatReport; matched tensors of the fixed layers get a new ``transform``.
        target: The target's descriptors (``flatten_of`` recorded).
        source_order: Target layer prefix -> the checkpoint producer's channel order (``channels_first`` or
            ``channels_last``), or None when unknown.

    Returns:
        One message per fixed layer (for ``report.warnings``).

    Raises:
        IncompatibleWeightsError: The weight's layout cannot be re-ordered (an unexpected transform).
    """
    notes = []
    for i, m in enumerate(report.matched):
        prefix, _, leaf = m.key.rpartition(".")
        d = target.get(prefix)
        if d is None or leaf != "weight" or "flatten_of" not in d.attrs:
            continue
        per_sample, dst_order = d.attrs["flatten_of"]
        src_order = source_order(prefix)
        if src_order is None or src_order == dst_order:
            continue
        if dst_order == "channels_last":
            spatial, channels = per_sample[:-1], per_sample[-1]
        else:
            channels, spatial = per_sample[0], per_sample[1:]
        if math.prod(spatial) == 1:
            continue
        out_features = m.shape[0]
        fix = _flatten_perm(d.kind, m.transform, out_features, tuple(spatial), channels, src_order, dst_order)
        if fix is None:
            raise IncompatibleWeightsError(
                f"{prefix} ({d.cls}): it reads a flattened {dst_order.replace('_', '-')} feature map of shape "
                f"{list(per_sample)}, but the checkpoint was flattened {src_order.replace('_', '-')}; hubload "
                "cannot re-order this weight's columns (unexpected layout). Nothing was loaded.", report=report)
        report.matched[i] = dataclasses.replace(m, transform=fix, rule=(m.rule or "") + "+flatten-order")
        notes.append(f"{prefix} ({d.cls}): reads a flattened {dst_order.replace('_', '-')} feature map "
                     f"{list(per_sample)}; the checkpoint's columns are {src_order.replace('_', '-')} order, so "
                     "they were permuted while loading (the classic torch<->Keras Flatten bug)")
    return notes


from hubload.divergence import Verification, first_divergent, max_abs_diff, tolerance  # noqa: E402  (re-exported)

