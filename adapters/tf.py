"""TensorFlow/Keras adapter: read TF checkpoints, describe a Keras model, load weights into it.

Protocol (shared with :mod:`hubload.adapters.torch`, see :mod:`hubload.adapters`):

* :func:`owns` – ``isinstance(model, keras.layers.Layer)`` (``keras.Model`` included).
* :func:`spec` – every variable of ``model.weights``, named by the model's structure as Keras' saving_lib
  walks it (:func:`~hubload.adapters._keras_paths.walk`: attribute paths, list positions, layer names that
  are not auto-generated) and translated by its layer class's spec in :mod:`hubload.keras_layers`
  (``dense1/kernel`` ``[in, out]`` -> ``dense1.weight`` ``[out, in]``; an LSTM cell -> ``weight_ih_l0`` ...).
  Entries keep the variable, the canonical -> Keras transform, the ``.weights.h5`` path (``structural``),
  the N-to-M group they belong to, or the reason a non-weight state is ignored.
* :func:`apply` – checks every matched tensor from metadata, then reads, converts and assigns one tensor
  (or group) at a time, spooling each variable's old value to a temporary file for the rollback.
* :func:`build` – ``"package.module:callable"`` + config, returning a built model.
* :func:`freeze` (extra, used by ``hubload.load(freeze=...)``) – ``variable.trainable = False`` by name.

Native paths, for artifacts made by the same model class: :func:`restore_native`
(``tf.train.Checkpoint(...).restore`` + ``assert_existing_objects_matched``, optimizer included),
:func:`load_weights` (``model.load_weights`` for a ``.weights.h5``) and :func:`load_full` for whole-model
artifacts (SavedModel folders, ``.keras`` files with ``safe_mode=True``). The native loaders roll the
model back to its previous values if loading fails part-way.

:class:`TFCheckpointReader` reads ``tf.train.Checkpoint`` files by name, keeping model variables apart
from optimizer state and ``save_counter``.

The assigning code lives in :mod:`hubload.adapters.keras_apply`, the TF-checkpoint reader and the native paths
in :mod:`hubload.adapters.tf_checkpoint`; both are re-exported here, so this module is the whole adapter.

Importing this module imports tensorflow and keras; that is the opt-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from hubload.adapters import ModelTensor, call_architecture
from hubload.adapters._keras_paths import attribute_entries, walk
from hubload.checkpoint import canonical_dtype, to_numpy
from hubload.errors import (
    HubloadError,
    RegistryError,
    UsageError,
)
from hubload.keras_layers import GroupRule, name_leaf, rnn_group_for, spec_for_mro
from hubload.layout import apply_transform

__all__ = [
    "TFCheckpointReader",
    "apply",
    "build",
    "freeze",
    "load_full",
    "load_weights",
    "name",
    "owns",
    "require_built",
    "restore_native",
    "spec",
    "to_numpy",
]

logger = logging.getLogger("hubload")

name = "tf"



# -------------------------------------------------------------------------------------------- protocol


def owns(model: Any) -> bool:
    """True for a Keras layer or model."""
    return isinstance(model, keras.layers.Layer)


def require_built(model: Any) -> None:
    """Refuse a model whose variables do not exist yet."""
    if not getattr(model, "built", False) or not model.weights:
        raise UsageError(f"{type(model).__name__} is not built (it has no variables yet); build it first, "
                         "e.g. call it once on a sample input (model(x)) or model.build(input_shape)")


def _mro_names(layer: Any) -> list[str]:
    """Class names of a layer's MRO, most derived first."""
    return [cls.__name__ for cls in type(layer).__mro__]


def _einsum_facts(layer: Any) -> dict[str, Any]:
    """Kernel axes an EinsumDense contracts with its input, read from its equation."""
    equation = getattr(layer, "equation", None)
    if not isinstance(equation, str) or "->" not in equation or "," not in equation:
        return {}
    lhs, out = equation.replace("...", "").split("->")
    kernel = lhs.split(",")[1]
    return {"in_axes": tuple(i for i, ch in enumerate(kernel) if ch not in out)}


_NON_WEIGHT_REASONS = (("SeedGenerator", "random-seed state, not a weight"),
                       ("BaseOptimizer", "optimizer state, not a model weight"),
                       ("Metric", "metric state, not a model weight"))


def _non_weight_reason(owner: Any) -> str:
    """Why a saved variable that is not in ``model.weights`` is left alone."""
    names = _mro_names(owner)
    for cls, reason in _NON_WEIGHT_REASONS:
        if cls in names:
            return reason
    return "saved state that is not in model.weights"


@dataclass(eq=False)
class GroupBinding:
    """A group rule bound to one layer's variables: canonical members <-> Keras variables (N to M).

    Attributes:
        rule: The :class:`~hubload.keras_layers.GroupRule`.
        variables: Keras leaf -> variable.
        members: Canonical leaf -> full canonical name.
        layer: Canonical module path of the layer, for messages.
    """

    rule: GroupRule
    variables: dict[str, Any]
    members: dict[str, str]
    layer: str

    @property
    def keras_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keras leaf -> variable shape."""
        return {k: tuple(int(d) for d in v.shape) for k, v in self.variables.items()}

    def to_keras(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Canonical arrays (by full name) -> Keras arrays (by leaf)."""
        by_leaf = {leaf: arrays[name] for leaf, name in self.members.items()}
        return self.rule.to_keras(by_leaf, self.keras_shapes)


@dataclass(eq=False)
class Alternative:
    """Another canonical form of some model tensors (MultiHeadAttention packed as ``in_proj_weight``).

    :func:`hubload.compat.check` swaps the tensors in ``replaces`` for ``tensors`` when the checkpoint has
    every name of ``tensors`` and none of ``replaces``.
    """

    replaces: tuple[str, ...]
    tensors: dict[str, ModelTensor]


@dataclass(frozen=True)
class _PackedAttention(GroupRule):
    """Separate q/k/v Linear weights (canonical, ``[HD, E]``) <-> ``nn.MultiheadAttention``'s packed form."""

    name: str = "mha-packed"

    def to_keras(self, canonical: Mapping[str, Any], keras_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        w = np.asarray(canonical["in_proj_weight"])
        b = np.asarray(canonical["in_proj_bias"]) if "in_proj_bias" in canonical else None
        ws, bs = np.split(w, 3, axis=0), (np.split(b, 3, axis=0) if b is not None else (None,) * 3)
        out: dict[str, Any] = {}
        for role, wi, bi in zip(("query", "key", "value"), ws, bs):
            out[f"{role}_dense.weight"] = wi
            if bi is not None:
                out[f"{role}_dense.bias"] = bi
        out["output_dense.weight"] = canonical["out_proj.weight"]
        if "out_proj.bias" in canonical:
            out["output_dense.bias"] = canonical["out_proj.bias"]
        return out


def _packed_attention(prefix: str, out: Mapping[str, ModelTensor]) -> Alternative | None:
    """The ``nn.MultiheadAttention`` form of a MultiHeadAttention's separate q/k/v tensors, if it has one."""
    p = f"{prefix}." if prefix else ""
    names = {f"{r}_dense.{leaf}": f"{p}{r}_dense.{leaf}" for r in ("query", "key", "value", "output")
             for leaf in ("weight", "bias")}
    have = {k: out[v] for k, v in names.items() if v in out}
    w = [have.get(f"{r}_dense.weight") for r in ("query", "key", "value")]
    o = have.get("output_dense.weight")
    if any(x is None for x in w) or o is None or len({x.shape for x in w}) != 1:
        return None
    hd, e = w[0].shape
    if hd != e or o.shape != (e, hd):  # nn.MultiheadAttention packs only when kdim == vdim == embed_dim
        return None
    with_bias = all(f"{r}_dense.bias" in have for r in ("query", "key", "value"))
    members = {"in_proj_weight": f"{p}in_proj_weight", "out_proj.weight": f"{p}out_proj.weight"}
    if with_bias:
        members["in_proj_bias"] = f"{p}in_proj_bias"
    if "output_dense.bias" in have:
        members["out_proj.bias"] = f"{p}out_proj.bias"
    binding = _PackedBinding(_PackedAttention(), {k: v for k, v in have.items()}, members, prefix)
    shapes = {"in_proj_weight": (3 * hd, e), "in_proj_bias": (3 * hd,), "out_proj.weight": (e, hd),
              "out_proj.bias": (e,)}
    dtype = w[0].dtype
    tensors = {full: ModelTensor(full, shapes[leaf], dtype, f"{prefix or '<root>'} (packed attention)",
                                 rule="mha-packed", group=binding) for leaf, full in members.items()}
    return Alternative(tuple(names[k] for k in have), tensors)


@dataclass(eq=False)
class _PackedBinding(GroupBinding):
    """The packed attention rule bound to the separate tensors' model specs."""

    def to_keras(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        by_leaf = {leaf: arrays[name] for leaf, name in self.members.items()}
        return self.rule.to_keras(by_leaf, {})

    def assignments(self, arrays: Mapping[str, np.ndarray]) -> list[tuple[Any, np.ndarray, str]]:
        """(variable, Keras array, name) for each separate tensor."""
        out = []
        for sep_leaf, arr in self.to_keras(arrays).items():
            target: ModelTensor = self.variables[sep_leaf]
            out.append((target.handle, apply_transform(arr, target.transform), target.name))
        return out


def spec(model: Any) -> dict[str, ModelTensor]:
    """The model's variables as canonical tensor specs, named by the model's structure.

    Every variable in ``model.weights`` is in the result, named as :func:`~hubload.adapters._keras_paths.walk`
    says (attribute paths, list indices, layer names that are not auto-generated) and translated by its layer
    class's spec in :mod:`hubload.keras_layers` (``dense1/kernel [in, out]`` -> ``dense1.weight [out, in]``;
    an LSTM cell's three variables -> ``weight_ih_l0``/``weight_hh_l0``/``bias_ih_l0``/``bias_hh_l0``).
    Saved state that is not a weight (seed generators, optimizer and metric variables) is in the result too,
    with ``ignored`` set to the reason, so the report lists it.

    Args:
        model: A built Keras model or layer.

    Returns:
        Canonical name -> :class:`~hubload.adapters.ModelTensor` (``native``: Keras path, ``structural``: the
        ``.weights.h5`` dataset path, ``handle``: the variable, ``transform``: canonical -> Keras; members of
        an N-to-M group carry ``group`` instead of a handle/transform; ``alternative``: another canonical
        form those tensors may take).

    Raises:
        HubloadError: The model is not built, a weight cannot be placed (named by its path), or two
            variables map to one canonical name.
    """
    require_built(model)
    weights = {id(v): v for v in model.weights}
    visited: list[tuple[Any, tuple[str, ...]]] = []
    entries = walk(model, visited)
    saved = {id(e.value) for e in entries}
    if any(i not in saved for i in weights):  # weights saving_lib skips (a sublayer called "output")
        entries += [e for e in attribute_entries(model) if id(e.value) in weights and id(e.value) not in saved]
    by_owner: dict[int, list[Any]] = {}
    owners: dict[int, Any] = {}
    for e in entries:
        by_owner.setdefault(id(e.owner), []).append(e)
        owners[id(e.owner)] = e.owner
    out: dict[str, ModelTensor] = {}
    seen: set[int] = set()

    def add(t: ModelTensor) -> None:
        if t.name in out:
            raise HubloadError(f"{type(model).__name__}: variables {out[t.name].native!r} and {t.native!r} both "
                               f"map to canonical name {t.name!r}")
        out[t.name] = t

    mha_prefixes = [".".join(segs) for obj, segs in visited if "MultiHeadAttention" in _mro_names(obj)]
    for oid, group in by_owner.items():
        owner = owners[oid]
        mro = _mro_names(owner)
        layer_spec = spec_for_mro(mro)
        segs = group[0].segments
        own = [e for e in group if id(e.value) in weights]
        for e in group:
            if id(e.value) not in weights and isinstance(e.value, keras.Variable):
                path = "/".join((*e.segments, e.leaf))
                add(ModelTensor(".".join((*e.segments, e.leaf)), tuple(int(d) for d in getattr(e.value, "shape", ())),
                                canonical_dtype(getattr(e.value, "dtype", "float32")), path,
                                handle=e.value, structural=e.structural or None,
                                ignored=_non_weight_reason(owner)))
        if not own:
            continue
        shapes = {e.leaf: tuple(int(d) for d in e.value.shape) for e in own}
        rule = None
        if layer_spec is not None and layer_spec.group:
            found = rnn_group_for(layer_spec.keras_class, segs, shapes)
            if found is not None:
                rule, prefix = found
        if rule is not None:
            p = ".".join(prefix)
            canon = rule.canonical_shapes(shapes)
            members = {leaf: f"{p}.{leaf}" if p else leaf for leaf in canon}
            binding = GroupBinding(rule, {e.leaf: e.value for e in own}, members, p or "<root>")
            dtype = canonical_dtype(own[0].value.dtype)
            native = "+".join("/".join((*e.segments, e.leaf)) for e in own)
            for leaf, full in members.items():
                add(ModelTensor(full, canon[leaf], dtype, native, rule=rule.name, group=binding))
            seen.update(id(e.value) for e in own)
            continue
        facts = _einsum_facts(owner) if "EinsumDense" in mro else {}
        for e in own:
            shape = shapes[e.leaf]
            cleaf, fwd, rule_name = name_leaf(layer_spec, e.leaf, shape, facts)
            name = ".".join((*e.segments, cleaf))
            cshape = fwd.out_shape(shape) if fwd is not None else shape
            add(ModelTensor(name, cshape, canonical_dtype(e.value.dtype), "/".join((*e.segments, e.leaf)),
                            fwd.inverse() if fwd is not None else None, rule_name, e.value,
                            structural=e.structural or None))
            seen.add(id(e.value))
    unplaced = [v for i, v in weights.items() if i not in seen]
    if unplaced:
        raise HubloadError(f"{type(model).__name__}: {len(unplaced)} weight(s) are not saved by any layer's "
                           f"save_own_variables, so hubload cannot name them: "
                           f"{', '.join(str(getattr(v, 'path', v.name))[-120:] for v in unplaced[:5])}")
    for prefix in mha_prefixes:
        alt = _packed_attention(prefix, out)
        if alt is not None:
            for name in alt.replaces:
                out[name] = dataclasses.replace(out[name], alternative=alt)
    return out


def freeze(model: Any, names: list[str]) -> None:
    """Make the named variables non-trainable (``variable.trainable = False``).

    Args:
        model: A built Keras model.
        names: Canonical names (as in :func:`spec` and the report).

    Raises:
        HubloadError: A name is not one of the model's variables.
    """
    from hubload.families import family_model_spec

    # A keras-hub family backbone is loaded (and reported) under the Hub's names: look those up too.
    model_spec = {**spec(model), **(family_model_spec(model, "torch") or {})}
    unknown = [n for n in names if n not in model_spec]
    if unknown:
        raise UsageError(f"{type(model).__name__}: cannot freeze {unknown[:5]}: no such variable")
    for n in names:
        model_spec[n].handle.trainable = False


def build(architecture: str, config: dict[str, Any] | None = None) -> Any:
    """Instantiate a Keras model from ``"package.module:callable"`` and keyword ``config``.

    Args:
        architecture: Import path of a class or factory, e.g. ``"hubload.zoo.keras_models:mlp"``.
        config: Keyword arguments for it.

    Returns:
        The built Keras model.

    Raises:
        RegistryError: Bad module/callable/config, not a Keras model, or not built (a factory must
            build its model, e.g. by calling it on a sample input).
        MissingDependencyError: The module needs a framework that is not installed.
    """
    model = call_architecture(architecture, config)
    if not isinstance(model, keras.layers.Layer):
        raise RegistryError(f"architecture {architecture!r} returned a {type(model).__name__}, not a Keras "
                            "model; point it at a Keras model class or factory", field="architecture")
    if not model.built:
        raise RegistryError(f"architecture {architecture!r} returned an unbuilt {type(model).__name__}; the "
                            "factory must build it (call it on a sample input or model.build(shape))",
                            field="architecture")
    return model


# ------------------------------------------------------------------- rest of the adapter Protocol
# Declared so api.py never branches on the adapter's name (see hubload.adapters.Adapter).

native_layout = "keras"
native_formats: tuple[str, ...] = ("tf-checkpoint",)
apply_options = frozenset({"dtype_policy", "model_spec"})
dtype_policies: tuple[str, ...] | None = ("model",)  # Keras variables keep their dtype


def place(model: Any, device: Any) -> Any:
    """Keras places variables itself; ``device=`` is refused rather than ignored."""
    if device is None:
        return model
    from hubload.errors import UsageError

    raise UsageError(f"device={device!r} is for torch models; Keras places variables itself (build the model "
                     "under `with tf.device(...)` instead)")


def build_scope(strategy: Any) -> Any:
    """``strategy.scope()`` (a no-op context for None)."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


from hubload.adapters.keras_apply import (  # noqa: E402  (assigning, rollback: see that module)
    apply,
    checkpoint_values,
    restore,
    snapshot,
)
from hubload.adapters.tf_checkpoint import (  # noqa: E402  (TF checkpoints, native paths: see that module)
    TFCheckpointReader,
    load_full,
    load_weights,
    restore_native,
)
from hubload.adapters.keras_behaviour import (  # noqa: E402  (behaviour checks, see that module)
    describe,
    infer_inputs,
    read_tensor,
    run,
    to_canonical_inputs,
    to_native_inputs,
)


def collective_load(model: Any) -> bool:
    """Keras loads are per process: under tf.distribute each worker loads its own copy (no vote across workers)."""
    return False


__all__ += ["apply_options", "build_scope", "checkpoint_values", "collective_load", "describe", "dtype_policies",  # noqa: PLE0605
            "infer_inputs", "native_formats", "native_layout", "place", "read_tensor", "restore", "run", "snapshot",
            "to_canonical_inputs", "to_native_inputs"]
