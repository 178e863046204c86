"""Canonical layout: the PyTorch ``state_dict`` convention, and the table that translates Keras into it.

Canonical names are dotted module paths (``encoder.layer.0.attention.self.query.weight``); canonical
shapes are PyTorch's (Linear ``[out, in]``, Conv ``[out, in, *kernel]``). A Keras variable path
(``dense1/kernel``) is translated by :data:`KERAS_RULES`, a table of reversible rows keyed by the
variable's leaf name and rank. Each row says how to permute (and, for depthwise kernels, reshape) the
Keras array into the PyTorch one; :meth:`Transform.inverse` goes back.

Notes on the table:
    * Transposed convolutions need no rows of their own: Keras ``Conv2DTranspose`` stores
      ``[h, w, out, in]`` and PyTorch ``ConvTranspose2d`` ``[in, out, h, w]``, which is the *same*
      permutation as Conv2D's HWIO -> OIHW (likewise 1D/3D). The ``conv*-transpose-kernel`` rows exist
      only so a caller can name them in ``rules=``; by default the Conv rows fire with the same result.
    * Keras 3 names a ``DepthwiseConv2D``/``DepthwiseConv1D`` kernel plain ``kernel``, so leaf and rank
      cannot tell it from a Conv kernel: pass the layer class (``layer=`` / ``layer_kinds=``, which
      :class:`~hubload.readers.KerasWeightsReader` provides) or force the rule by name
      (``rule=`` / ``forced_rules=``). Keras 2 and ``SeparableConv*`` use ``depthwise_kernel``, which
      the table recognises alone. ``SeparableConv*`` ``pointwise_kernel`` has no PyTorch counterpart in a
      single module and passes through untranslated.
    * Leaves are matched by rank, so an ``EinsumDense`` kernel of rank 3 (Keras MultiHeadAttention)
      would be read as a Conv1D kernel; models with such layers need registry rename/transpose rules.
    * Keras 3 writes some leaves with a leading underscore in TF checkpoints (``_kernel``,
      ``_embeddings``); they are treated as the plain leaf.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from hubload.checkpoint import canonical_dtype
from hubload.errors import CheckpointError, RegistryError
from hubload.keys import (  # re-exported: key matching used to live here
    NON_PERSISTENT_BUFFERS,
    WRAPPER_PREFIXES,
    PrefixAlignment,
    align_prefixes,
    ignorable_reason,
    strip_wrapper_prefixes,
)

__all__ = [
    "KERAS_RULES",
    "NON_PERSISTENT_BUFFERS",
    "TF_VARIABLE_SUFFIX",
    "WRAPPER_PREFIXES",
    "CanonicalTensor",
    "PrefixAlignment",
    "RenameRule",
    "Rule",
    "Transform",
    "align_prefixes",
    "apply_rename",
    "apply_transform",
    "canonical_to_keras",
    "compile_rename_rules",
    "from_canonical",
    "ignorable_reason",
    "keras_name_to_canonical",
    "keras_layer_rules",
    "layer_kind",
    "normalize_keras_path",
    "strip_wrapper_prefixes",
    "to_canonical",
]

TF_VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


# ------------------------------------------------------------------------------------------ transforms


@dataclass(frozen=True)
class Transform:
    """An array re-layout: optional reshape, then a permutation, then an optional reshape.

    ``pre_reshape`` and ``reshape`` are concrete target shapes, so a transform with a reshape is built
    for one input shape (``in_shape``), which is what makes it invertible.

    Attributes:
        perm: Axes for ``numpy.transpose`` (``out.shape[i] == in.shape[perm[i]]``), or None.
        reshape: Shape to reshape to after the permutation, or None.
        pre_reshape: Shape to reshape to before the permutation, or None.
        in_shape: The input shape the transform was built for (required when reshaping).
    """

    perm: tuple[int, ...] | None = None
    reshape: tuple[int, ...] | None = None
    pre_reshape: tuple[int, ...] | None = None
    in_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.perm is not None and sorted(self.perm) != list(range(len(self.perm))):
            raise ValueError(f"perm {self.perm} is not a permutation")
        if (self.reshape is not None or self.pre_reshape is not None) and self.in_shape is None:
            raise ValueError("a Transform with a reshape needs in_shape to be invertible")

    @property
    def is_identity(self) -> bool:
        """True when the transform changes nothing."""
        return (self.reshape is None and self.pre_reshape is None
                and (self.perm is None or self.perm == tuple(range(len(self.perm)))))

    def out_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the result for an input of ``shape``.

        Raises:
            ValueError: ``shape`` does not fit the transform.
        """
        shape = tuple(int(d) for d in shape)
        if self.in_shape is not None and shape != self.in_shape:
            raise ValueError(f"transform built for shape {list(self.in_shape)} got {list(shape)}")
        if self.pre_reshape is not None:
            shape = self.pre_reshape
        if self.perm is not None:
            if len(self.perm) != len(shape):
                raise ValueError(f"perm {self.perm} does not fit rank-{len(shape)} shape {list(shape)}")
            shape = tuple(shape[i] for i in self.perm)
        if self.reshape is not None:
            shape = self.reshape
        return shape

    def apply(self, array: Any) -> Any:
        """Apply to a numpy array (or anything with ``.reshape`` and ``.transpose(axes)``)."""
        if self.in_shape is not None and tuple(array.shape) != self.in_shape:
            raise ValueError(f"transform built for shape {list(self.in_shape)} got {list(array.shape)}")
        if self.pre_reshape is not None:
            array = array.reshape(self.pre_reshape)
        if self.perm is not None:
            array = array.transpose(self.perm)
        if self.reshape is not None:
            array = array.reshape(self.reshape)
        return array

    def inverse(self) -> Transform:
        """The transform that undoes this one."""
        inv = None
        if self.perm is not None:
            inv_list = [0] * len(self.perm)
            for i, p in enumerate(self.perm):
                inv_list[p] = i
            inv = tuple(inv_list)
        if self.reshape is None and self.pre_reshape is None:
            return Transform(perm=inv)
        in_shape = self.in_shape or ()  # never empty here: __post_init__ requires it with a reshape
        mid = self.pre_reshape if self.pre_reshape is not None else in_shape
        after_perm = tuple(mid[i] for i in self.perm) if self.perm is not None else mid
        return Transform(
            pre_reshape=after_perm if self.reshape is not None else None,
            perm=inv,
            reshape=in_shape if self.pre_reshape is not None else None,
            in_shape=self.out_shape(in_shape),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {k: (list(v) if v is not None else None) for k, v in
                (("perm", self.perm), ("reshape", self.reshape), ("pre_reshape", self.pre_reshape),
                 ("in_shape", self.in_shape))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transform:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: (tuple(data[k]) if data.get(k) is not None else None)
                      for k in ("perm", "reshape", "pre_reshape", "in_shape")})


def apply_transform(array: Any, transform: Transform | None) -> Any:
    """Apply ``transform`` to a numpy array; None means unchanged.

    Args:
        array: numpy array (torch tensors: the torch adapter uses ``permute``/``reshape``).
        transform: The transform, or None.

    Returns:
        The re-laid-out array (a view where numpy allows).
    """
    return array if transform is None else transform.apply(array)


# ----------------------------------------------------------------------------------------- rule table


@dataclass(frozen=True)
class Rule:
    """One reversible row of the Keras <-> canonical table.

    Attributes:
        name: Rule name shown in reports ("dense-kernel").
        keras_leaf: Keras variable leaf ("kernel").
        torch_leaf: PyTorch parameter leaf ("weight").
        ndim: Rank the Keras variable must have (None = any).
        perm: Keras -> canonical permutation (None = no transpose).
        merge: For depthwise kernels: merge canonical axes 0 and 1 (``[in, mult, ...]`` ->
            ``[in*mult, 1, ...]``) after the permutation. Reversing it needs the Keras shape.
    """

    name: str
    keras_leaf: str
    torch_leaf: str
    ndim: int | None
    perm: tuple[int, ...] | None = None
    merge: bool = False

    def transform(self, keras_shape: Sequence[int]) -> Transform | None:
        """The keras -> canonical transform for a Keras variable of ``keras_shape``."""
        if self.perm is None and not self.merge:
            return None
        if not self.merge:
            return Transform(perm=self.perm)
        shape = tuple(int(d) for d in keras_shape)
        permuted = tuple(shape[i] for i in self.perm) if self.perm else shape
        return Transform(perm=self.perm, reshape=(permuted[0] * permuted[1], 1, *permuted[2:]), in_shape=shape)


KERAS_RULES: tuple[Rule, ...] = (
    Rule("dense-kernel", "kernel", "weight", 2, (1, 0)),
    Rule("conv1d-kernel", "kernel", "weight", 3, (2, 1, 0)),          # [k, in, out] -> [out, in, k]
    Rule("conv2d-kernel", "kernel", "weight", 4, (3, 2, 0, 1)),       # HWIO -> OIHW
    Rule("conv3d-kernel", "kernel", "weight", 5, (4, 3, 0, 1, 2)),    # DHWIO -> OIDHW
    Rule("depthwise-conv1d-kernel", "depthwise_kernel", "weight", 3, (1, 2, 0), merge=True),
    Rule("depthwise-conv2d-kernel", "depthwise_kernel", "weight", 4, (2, 3, 0, 1), merge=True),
    Rule("norm-gamma", "gamma", "weight", None),
    Rule("norm-beta", "beta", "bias", None),
    Rule("bn-moving-mean", "moving_mean", "running_mean", None),
    Rule("bn-moving-variance", "moving_variance", "running_var", None),
    Rule("embedding", "embeddings", "weight", None),
    Rule("bias", "bias", "bias", None),
    # Opt-in names only (see the module docstring): same permutations as the Conv rows above.
    Rule("conv1d-transpose-kernel", "kernel", "weight", 3, (2, 1, 0)),   # [k, out, in] -> [in, out, k]
    Rule("conv2d-transpose-kernel", "kernel", "weight", 4, (3, 2, 0, 1)),  # [h, w, out, in] -> [in, out, h, w]
    Rule("conv3d-transpose-kernel", "kernel", "weight", 5, (4, 3, 0, 1, 2)),
)

_KNOWN_KERAS_LEAVES = frozenset(r.keras_leaf for r in KERAS_RULES)


def _plain_leaf(leaf: str) -> str:
    """A Keras leaf without the leading underscore Keras 3 TF checkpoints add ("_kernel" -> "kernel")."""
    return leaf[1:] if leaf.startswith("_") and leaf[1:] in _KNOWN_KERAS_LEAVES else leaf


@functools.lru_cache(maxsize=None)
def keras_layer_rules() -> dict[str, dict[str, str]]:
    """Layer classes (snake case) whose variables need a rule that leaf + rank alone would not pick, from each
    class's spec in :mod:`hubload.keras_layers` (``LayerSpec.path_rules``): the one table of Keras layers."""
    from hubload.keras_layers import KERAS_LAYER_SPECS, snake_case

    out: dict[str, dict[str, str]] = {}
    for cls, spec in KERAS_LAYER_SPECS.items():
        if spec.path_rules:
            out[snake_case(cls)] = dict(spec.path_rules)
            out[re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", cls).lower()] = dict(spec.path_rules)  # Keras' auto names
    return out


def layer_kind(layer: str | None) -> str | None:
    """Snake-case Keras class from a class name ("DepthwiseConv2D") or snake name ("depthwise_conv2d_3")."""
    if not layer:
        return None
    snake = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", layer).lower()
    return snake if snake in keras_layer_rules() else re.sub(r"_\d+$", "", snake)


def _find_rule(leaf: str, ndim: int, rules: Sequence[Rule], *, rule: str | None = None,
               layer: str | None = None) -> Rule | None:
    """The rule for a Keras leaf of a given rank: forced by name, by layer class, or first match."""
    if rule is None and layer is not None:
        rule = keras_layer_rules().get(layer_kind(layer) or "", {}).get(leaf)
    if rule is not None:
        for r in rules:
            if r.name == rule:
                if r.ndim is not None and r.ndim != ndim:
                    raise ValueError(f"rule {rule!r} applies to rank-{r.ndim} tensors, got rank {ndim}")
                return r
        raise ValueError(f"unknown layout rule {rule!r}; known: {', '.join(r.name for r in rules)}")
    for r in rules:
        if r.keras_leaf == leaf and (r.ndim is None or r.ndim == ndim):
            return r
    return None


def normalize_keras_path(path: str) -> str:
    """Strip TF checkpoint decoration from a Keras variable path.

    ``model/dense1/_kernel/.ATTRIBUTES/VARIABLE_VALUE`` -> ``dense1/_kernel`` (the suffix and, only
    when the suffix was present, the root object's name); a ``:0`` suffix is dropped as well.
    """
    if path.endswith(TF_VARIABLE_SUFFIX):
        path = path[: -len(TF_VARIABLE_SUFFIX)]
        path = path.split("/", 1)[1] if "/" in path else path
    return path.removesuffix(":0")


def keras_name_to_canonical(path: str, shape: Sequence[int], *, layer: str | None = None, rule: str | None = None,
                            rules: Sequence[Rule] = KERAS_RULES) -> tuple[str, Transform | None, str | None]:
    """Canonical name and keras -> canonical transform of one Keras variable.

    Args:
        path: Keras variable path (``dense1/kernel``, ``blocks/0/_kernel``, or a raw TF checkpoint key).
        shape: The Keras variable's shape.
        layer: The owning layer's class ("DepthwiseConv2D" or "depthwise_conv2d"), when known; selects
            rules from :func:`keras_layer_rules` (needed for Keras 3 depthwise kernels).
        rule: Force a rule by name (a registry entry's explicit choice).
        rules: The rule table (default :data:`KERAS_RULES`).

    Returns:
        ``(canonical_name, transform, rule_name)``; transform None means no re-layout, rule_name None
        means no rule fired (the leaf is kept as is, e.g. a custom layer's variable).
    """
    path = normalize_keras_path(path)
    *parents, leaf = path.split("/")
    leaf = _plain_leaf(leaf)
    found = _find_rule(leaf, len(shape), rules, rule=rule, layer=layer)
    canonical = ".".join([*parents, found.torch_leaf if found else leaf])
    if found is None:
        return canonical, None, None
    return canonical, found.transform(shape), found.name


def canonical_to_keras(name: str, shape: Sequence[int], leaf_hint: str, *,
                       keras_shape: Sequence[int] | None = None, layer: str | None = None,
                       rule: str | None = None,
                       rules: Sequence[Rule] = KERAS_RULES) -> tuple[str, Transform | None, str | None]:
    """Keras variable path and canonical -> keras transform for a canonical tensor.

    The canonical leaf alone is ambiguous (``weight`` may be a kernel, gamma or embeddings), so the
    caller says which Keras leaf it wants.

    Args:
        name: Canonical name (``dense1.weight``).
        shape: Canonical shape.
        leaf_hint: Keras leaf to produce (``kernel``, ``gamma`` ...).
        keras_shape: The Keras variable's shape; required for depthwise kernels (the channel
            multiplier cannot be read from the canonical shape).
        layer: The Keras layer class, as for :func:`keras_name_to_canonical`.
        rule: Force a rule by name.
        rules: The rule table.

    Returns:
        ``(keras_path, transform canonical -> keras or None, rule_name or None)``.

    Raises:
        ValueError: A depthwise kernel without ``keras_shape``, or ``keras_shape`` inconsistent.
    """
    *parents, leaf = name.split(".")
    keras_leaf = _plain_leaf(leaf_hint)
    path = "/".join([*parents, leaf_hint])
    found = None
    if rule is not None or layer is not None:
        found = _find_rule(keras_leaf, len(shape), rules, rule=rule, layer=layer)
    if found is None:
        for r in rules:
            if r.keras_leaf == keras_leaf and r.torch_leaf == leaf and (r.ndim is None or r.ndim == len(shape)):
                found = r
                break
    if found is None or found.torch_leaf != leaf:
        return path, None, None
    if found.merge:
        if keras_shape is None:
            raise ValueError(f"{name}: a depthwise kernel needs keras_shape to undo the channel merge")
        fwd = found.transform(keras_shape)
    else:
        fwd = found.transform(shape)  # perm-only transforms do not depend on the shape
    if fwd is None:
        return path, None, found.name
    if keras_shape is not None and fwd.out_shape(keras_shape) != tuple(shape):
        raise ValueError(f"{name}: Keras shape {list(keras_shape)} does not correspond to canonical {list(shape)}")
    return path, fwd.inverse(), found.name


# ------------------------------------------------------------------------------------------- renaming


@dataclass(frozen=True)
class RenameRule:
    """A compiled ``{pattern: regex, replace: str}`` rename rule."""

    pattern: re.Pattern[str]
    replace: str


def compile_rename_rules(rules: Iterable[Any]) -> tuple[RenameRule, ...]:
    """Compile rename rules given as dicts ``{"pattern", "replace"}``, pairs, or RenameRules.

    Args:
        rules: The rules, applied later in order.

    Returns:
        Compiled rules.

    Raises:
        RegistryError: A rule is malformed or its regex does not compile (field "rename").
    """
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, RenameRule):
            out.append(rule)
            continue
        if isinstance(rule, Mapping):
            if set(rule) != {"pattern", "replace"}:
                raise RegistryError(f"rename rule #{i + 1} must have exactly the keys 'pattern' and 'replace', "
                                    f"got {sorted(rule)}", field="rename")
            pattern, replace = rule["pattern"], rule["replace"]
        elif isinstance(rule, (tuple, list)) and len(rule) == 2:
            pattern, replace = rule
        else:
            raise RegistryError(f"rename rule #{i + 1} must be {{pattern: regex, replace: str}} or a "
                                f"(pattern, replace) pair, got {rule!r}", field="rename")
        if not isinstance(pattern, str) or not isinstance(replace, str):
            raise RegistryError(f"rename rule #{i + 1}: pattern and replace must be strings", field="rename")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise RegistryError(f"rename rule #{i + 1}: invalid regex {pattern!r}: {exc}", field="rename") from exc
        try:  # catch bad group references now rather than on the first matching name
            _check_template(compiled, replace)
        except re.error as exc:
            raise RegistryError(f"rename rule #{i + 1}: invalid replacement {replace!r} for {pattern!r}: {exc}",
                                field="rename") from exc
        out.append(RenameRule(compiled, replace))
    return tuple(out)


def _check_template(pattern: re.Pattern[str], replace: str) -> None:
    """Raise re.error if ``replace`` references groups ``pattern`` lacks."""
    for m in re.finditer(r"\\(\d+)|\\g<([^>]*)>", replace):
        ref = m.group(1) or m.group(2)
        if ref.isdigit():
            if int(ref) > pattern.groups:
                raise re.error(f"invalid group reference {ref}")
        elif ref not in pattern.groupindex:
            raise re.error(f"unknown group name {ref!r}")


def apply_rename(name: str, rules: Sequence[RenameRule]) -> str:
    """Apply compiled rename rules to one canonical name, in order."""
    for rule in rules:
        name = rule.pattern.sub(rule.replace, name)
    return name


# ------------------------------------------------------------------------------------ canonical tensors


@dataclass(frozen=True)
class CanonicalTensor:
    """A checkpoint (or model) tensor seen in the canonical layout.

    Attributes:
        canonical: Canonical name ("dense1.weight").
        source: Native name in the checkpoint/model ("dense1/kernel").
        shape: Canonical shape.
        dtype: Canonical dtype name.
        transform: Native -> canonical re-layout (None = as stored); ``.inverse()`` goes back.
        rule: The layout rule that fired, for reports.
    """

    canonical: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    transform: Transform | None = None
    rule: str | None = None

    def __init__(self, canonical: str, source: str, shape: tuple[int, ...], dtype: str,
                 transform: Transform | None = None, rule: str | None = None) -> None:
        # Frozen, filled in one call (see hubload.checkpoint.TensorInfo.__init__).
        self.__dict__.update(canonical=canonical, source=source, shape=shape, dtype=dtype, transform=transform,
                             rule=rule)


def to_canonical(tensors: Mapping[str, Any], layout: str, *, rename: Iterable[Any] = (),
                 layer_kinds: Mapping[str, str] | None = None, forced_rules: Mapping[str, str] | None = None,
                 rules: Sequence[Rule] = KERAS_RULES) -> dict[str, CanonicalTensor]:
    """Translate native tensor metadata into the canonical layout.

    Args:
        tensors: Native name -> TensorInfo (or anything with ``.shape`` and ``.dtype``).
        layout: "torch" (names kept) or "keras" (paths translated by ``rules``).
        rename: Rename rules applied to canonical names afterwards (see :func:`compile_rename_rules`).
        layer_kinds: Native name -> Keras layer class (e.g. ``KerasWeightsReader.layer_kinds``).
        forced_rules: Native-name glob -> rule name, for variables the table cannot recognise alone.
        rules: Keras rule table.

    Returns:
        Canonical name -> :class:`CanonicalTensor`, in input order.

    Raises:
        CheckpointError: Two native tensors end up with the same canonical name.
        RegistryError: A rename rule is invalid.
        ValueError: ``layout`` is neither "torch" nor "keras".
    """
    if layout not in ("torch", "keras"):
        raise ValueError(f"layout must be 'torch' or 'keras', got {layout!r}")
    compiled = compile_rename_rules(rename)
    out: dict[str, CanonicalTensor] = {}
    for native, info in tensors.items():
        shape = tuple(map(int, info.shape))
        if layout == "keras" and getattr(info, "canonical", ""):
            # A structural reader (.weights.h5) already named it by its layer's spec (hubload.keras_layers).
            name, transform, rule = info.canonical, info.transform, info.rule
            if transform is not None:
                shape = transform.out_shape(shape)
        elif layout == "keras":
            forced = next((r for g, r in (forced_rules or {}).items() if fnmatch.fnmatchcase(native, g)), None)
            name, transform, rule = keras_name_to_canonical(native, shape, layer=(layer_kinds or {}).get(native),
                                                            rule=forced, rules=rules)
            if transform is not None:
                shape = transform.out_shape(shape)
        else:
            name, transform, rule = native, None, None
        if compiled:
            name = apply_rename(name, compiled)
        if name in out:
            raise CheckpointError(f"tensors {out[name].source!r} and {native!r} both map to canonical name "
                                  f"{name!r}; add a rename rule to tell them apart")
        out[name] = CanonicalTensor(name, native, shape, canonical_dtype(info.dtype), transform, rule)
    return out


def from_canonical(tensors: Mapping[str, Any], leaf_hints: Mapping[str, str], *,
                   keras_shapes: Mapping[str, Sequence[int]] | None = None,
                   layer_kinds: Mapping[str, str] | None = None,
                   rules: Sequence[Rule] = KERAS_RULES) -> dict[str, tuple[str, Transform | None, str | None]]:
    """Keras paths and canonical -> keras transforms for many canonical tensors.

    Args:
        tensors: Canonical name -> object with ``.shape`` (canonical shape).
        leaf_hints: Canonical name -> Keras leaf to produce; names without a hint keep their leaf.
        keras_shapes: Canonical name -> Keras shape, needed for depthwise kernels.
        layer_kinds: Canonical name -> Keras layer class.
        rules: The rule table.

    Returns:
        Canonical name -> ``(keras_path, transform, rule_name)``.
    """
    out = {}
    for name, info in tensors.items():
        hint = leaf_hints.get(name, name.rsplit(".", 1)[-1])
        ks = (keras_shapes or {}).get(name)
        out[name] = canonical_to_keras(name, tuple(info.shape), hint, keras_shape=ks,
                                       layer=(layer_kinds or {}).get(name), rules=rules)
    return out
