"""Keras ``.weights.h5`` files (Keras 3, and the legacy Keras 2 ``.h5`` weight layout), read with h5py.

Keras 3 drops variable names from the file (``vars/0``, ``vars/1`` ...); this module names them again from a
table of per-layer variable orders (:data:`KERAS_VAR_ORDER`), which is the only Keras-specific knowledge the
framework-free core needs.

h5py is imported inside the reader: ``import hubload`` stays light.
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Iterable

from hubload.checkpoint import ReaderBase, TensorInfo, canonical_dtype
from hubload.errors import CheckpointError, MissingDependencyError
from hubload.keras_layers import (
    KERAS_LAYER_SPECS,
    LayerSpec,
    container_segments,
    functional_segments,
    name_leaf,
    rnn_group_for,
    snake_case,
    spec_for_snake,
)

__all__ = ["KERAS_VAR_ORDER", "KerasTensorInfo", "KerasWeightsReader"]

# Keras 3 .weights.h5 stores a layer's variables as vars/0, vars/1 ... without their names; the order is the
# layer's variable creation order, which each class's spec in hubload.keras_layers lists.
KERAS_VAR_ORDER: dict[str, tuple[str, ...]] = {snake_case(c): s.variables for c, s in KERAS_LAYER_SPECS.items()
                                               if s.variables}


@dataclass(frozen=True)
class KerasTensorInfo(TensorInfo):
    """A ``.weights.h5`` tensor, named by its dataset path, with the canonical name its structure gives.

    Attributes:
        canonical: Canonical name (``head.weight``).
        transform: Stored -> canonical re-layout, or None.
        rule: The spec rule that named it, or None (a variable of a class the file cannot tell).
    """

    canonical: str = ""
    transform: Any = None
    rule: str | None = None


def _keras_kind(key: str) -> str | None:
    """Layer class (snake case) from a name like ``conv2d_3``; None when unknown."""
    found = spec_for_snake(key)
    return snake_case(found.keras_class) if found is not None else None


def _leaf_names(spec: LayerSpec | None, shapes: list[tuple[int, ...]]) -> tuple[list[str], bool]:
    """Variable names for one layer's vars/0..n, and whether they are known (from the spec) or guessed."""
    n = len(shapes)
    if spec is not None and spec.variables:
        order = spec.variables
        if n == len(order):
            return list(order), True
        if n == len(order) - 1 and order[-1] == "bias":  # use_bias=False
            return list(order[:-1]), True
    # Unknown class: a kernel (rank >= 2) optionally followed by a vector bias is the common case.
    if n in (1, 2) and len(shapes[0]) >= 2 and (n == 1 or len(shapes[1]) == 1):
        return ["kernel", "bias"][:n], False
    return [str(i) for i in range(n)], False


def _keras_leaf_names(kinds: Iterable[str | None], shapes: list[tuple[int, ...]]) -> list[str]:
    """Best-effort variable names for one layer's vars/0..n (index strings where unknowable)."""
    spec = next((spec_for_snake(k) for k in kinds if k and spec_for_snake(k)), None)
    return _leaf_names(spec, shapes)[0]


def _counter(key: str) -> tuple[str, int]:
    """Sort key of a container key: ``dense_10`` after ``dense_2``."""
    m = re.fullmatch(r"(.*?)_(\d+)", key)
    return (m.group(1), int(m.group(2))) if m else (key, 0)


class KerasWeightsReader(ReaderBase):
    """A Keras 3 ``.weights.h5`` file (also the legacy Keras 2 ``.h5`` weight layout), via h5py.

    Keras 3 stores ``<attribute or container path>/vars/<index>``; the variable names are dropped. Tensors are
    named by that dataset path (``layers/dense_1/vars/0``), which a model's spec also carries, so loading into a
    model pairs them exactly. Each also gets the canonical name its structure gives
    (:class:`KerasTensorInfo`): segments as :func:`hubload.keras_layers.functional_segments` /
    :func:`~hubload.keras_layers.container_segments` say, leaves by the layer class's spec, the class read
    from the container key, the parent's spec (MultiHeadAttention's ``query_dense``, an RNN's ``cell``) or an
    auto-generated stored name. An RNN cell becomes its torch tensors (``weight_ih_l0`` ...), computed on read.

    Limits (without the model): a layer of unknown class (explicitly named attribute, custom class) keeps
    guessed leaves (``kernel``/``bias`` by shape, else indexes) in the Keras layout; a list of mixed classes
    keeps Keras' class-name counters; a subclassed model's sublayers that Keras stores under ``layers/`` lose
    their attribute names. The legacy Keras 2 ``.h5`` layout names datasets by their stored weight names.

    Args:
        path: The ``.weights.h5`` / ``.h5`` file.
        layer_names: Kept for compatibility; tensors are always named by their dataset path.

    Attributes:
        sources: Tensor name -> HDF5 dataset path.
        layer_kinds: Tensor name -> Keras layer class in snake case ("depthwise_conv2d"), where known;
            pass it to :func:`hubload.layout.to_canonical` (``layer_kinds=``) so that depthwise kernels,
            which Keras 3 names plain ``kernel``, get the depthwise rule.
    """

    format = "keras-weights"
    layout = "keras"

    def __init__(self, path: str | os.PathLike[str], *, layer_names: bool = True) -> None:
        try:
            import h5py
        except ImportError as exc:
            raise MissingDependencyError("reading .weights.h5", "tf", detail=str(exc)) from exc
        self.path = pathlib.Path(path)
        self._h5py = h5py
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: not a readable HDF5 file: {exc}") from exc
        self.sources: dict[str, str] = {}
        self.layer_kinds: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._virtual: dict[str, tuple[Any, dict[str, str], str]] = {}
        self._group_cache: tuple[Any, dict[str, Any]] | None = None
        try:
            if "layer_names" in self._file.attrs or "model_weights" in self._file:
                self._scan_legacy()
            else:
                self._scan(self._file, [], [], None, {})
        except BaseException:
            self._file.close()
            raise

    def _add(self, name: str, ds: Any, canonical: str = "", transform: Any = None, rule: str | None = None) -> None:
        """Record one dataset under ``name``."""
        if name in self._infos:
            raise CheckpointError(f"{self.path}: two variables map to the name {name!r} "
                                  f"({self.sources[name]} and {ds.name})")
        dtype = canonical_dtype(ds.dtype)
        shape = tuple(int(d) for d in ds.shape)
        nbytes = int(ds.size) * ds.dtype.itemsize
        if canonical:
            self._infos[name] = KerasTensorInfo(name, shape, dtype, nbytes, canonical, transform, rule)
        else:
            self._infos[name] = TensorInfo(name, shape, dtype, nbytes)
        self.sources[name] = ds.name

    def _stored_name(self, group: Any) -> str | None:
        """The layer name Keras stored on a group's ``vars`` subgroup."""
        vars_group = group.get("vars")
        if not isinstance(vars_group, self._h5py.Group):
            return None
        stored = vars_group.attrs.get("name")
        return stored.decode() if isinstance(stored, bytes) else stored

    def _is_saveable(self, group: Any) -> bool:
        """A layer's group has a ``vars`` subgroup (Keras makes one per named saveable); a container has not."""
        return isinstance(group.get("vars"), self._h5py.Group)

    def _scan(self, group: Any, path: list[str], segs: list[str], spec: LayerSpec | None,
              facts: dict[str, Any]) -> None:
        """Walk one saveable's group: its own ``vars``, then attributes and containers, as saving_lib wrote them."""
        h5py = self._h5py
        vars_group = group.get("vars")
        if isinstance(vars_group, h5py.Group) and len(vars_group):
            self._own(vars_group, path, segs, spec, facts)
        for key in group:
            child = group[key]
            if key == "vars" or not isinstance(child, h5py.Group):
                continue
            if self._is_saveable(child):
                child_spec, child_facts = self._child_spec(spec, key, child)
                self._scan(child, [*path, key], [*segs, key], child_spec, child_facts)
            else:
                self._container(child, [*path, key], segs if key == "layers" else [*segs, key], key == "layers")

    def _container(self, group: Any, path: list[str], segs: list[str], functional: bool) -> None:
        """A list/dict (or a functional model's ``layers``) entered with saving_lib's class-name counters."""
        keys = sorted((k for k in group if isinstance(group[k], self._h5py.Group)), key=_counter)
        if functional:
            names = functional_segments([(k, self._stored_name(group[k])) for k in keys])
        else:
            names = container_segments(keys)
        for key, seg in zip(keys, names):
            child = group[key]
            if self._is_saveable(child):
                self._scan(child, [*path, key], [*segs, seg], spec_for_snake(key), {})
            else:
                self._container(child, [*path, key], [*segs, seg], False)

    def _child_spec(self, parent: LayerSpec | None, attr: str, group: Any) -> tuple[LayerSpec | None, dict[str, Any]]:
        """The class of an attribute-held sublayer: from the parent's spec, else its stored auto-name."""
        if parent is not None and attr in parent.children:
            cls, facts = parent.children[attr]
            return KERAS_LAYER_SPECS.get(cls), dict(facts)
        stored = self._stored_name(group) or ""
        if attr in ("forward_layer", "backward_layer"):  # Bidirectional names its copies forward_lstm ...
            stored = re.sub(r"^(forward|backward)_", "", stored)
        return spec_for_snake(stored), {}

    def _own(self, vars_group: Any, path: list[str], segs: list[str], spec: LayerSpec | None,
             facts: dict[str, Any]) -> None:
        """Name one saveable's ``vars/<i>`` datasets by its class's spec (or by shape when unknown)."""
        datasets = [vars_group[k] for k in sorted((k for k in vars_group if k.isdigit()), key=int)]
        shapes = [tuple(int(d) for d in ds.shape) for ds in datasets]
        leaves, known = _leaf_names(spec, shapes)
        base = "/".join([*path, "vars"])
        if known and spec is not None and spec.group:
            found = rnn_group_for(spec.keras_class, segs, dict(zip(leaves, shapes)))
            if found is not None:
                rule, prefix = found
                sources = {leaf: ds.name for leaf, ds in zip(leaves, datasets)}
                for cleaf, cshape in rule.canonical_shapes(dict(zip(leaves, shapes))).items():
                    name = f"{base}/{cleaf}"
                    canonical = ".".join([*prefix, cleaf])
                    dtype = canonical_dtype(datasets[0].dtype)
                    self._infos[name] = KerasTensorInfo(name, cshape, dtype, 0, canonical, None, rule.name)
                    self.sources[name] = f"{base} ({rule.name})"
                    self._virtual[name] = (rule, sources, cleaf)
                return
        for i, (leaf, ds, shape) in enumerate(zip(leaves, datasets, shapes)):
            cleaf, fwd, rule = name_leaf(spec if known else None, leaf, shape, facts)
            self._add(f"{base}/{i}", ds, ".".join([*segs, cleaf]), fwd, rule)
            if spec is not None:
                self.layer_kinds[f"{base}/{i}"] = snake_case(spec.keras_class)

    def _scan_legacy(self) -> None:
        """Keras 2 / ``model.save('x.h5')`` layout: ``weight_names`` attributes name every dataset."""
        root = self._file["model_weights"] if "model_weights" in self._file else self._file
        for layer in root.attrs.get("layer_names", []):
            layer = layer.decode() if isinstance(layer, bytes) else layer
            g = root[layer]
            for wname in g.attrs.get("weight_names", []):
                wname = wname.decode() if isinstance(wname, bytes) else wname
                parts = wname.removesuffix(":0").split("/")
                # Keras 2 writes "d1/kernel:0", Keras 3 "sequential/d1/kernel": keep from the layer name on
                cut = len(parts) - 1 - parts[::-1].index(layer) if layer in parts[:-1] else None
                name = "/".join(parts[cut:]) if cut is not None else "/".join([layer, *parts])
                self._add(name, g[wname])

    def get(self, name: str) -> Any:
        """Read one variable as a numpy array.

        Raises:
            CheckpointError: No such variable, or the file is closed.
        """
        self._require(name)
        if not self._file:
            raise CheckpointError(f"{self.path}: reader is closed")
        if name in self._virtual:  # one output of a group conversion (an LSTM cell's weight_ih_l0 ...)
            rule, sources, cleaf = self._virtual[name]
            key = tuple(sorted(sources.values()))
            if self._group_cache is None or self._group_cache[0] != key:
                self._group_cache = (key, rule.to_canonical({k: self._file[v][()] for k, v in sources.items()}))
            return self._group_cache[1][cleaf]
        return self._file[self.sources[name]][()]

    def close(self) -> None:
        """Close the HDF5 file."""
        if self._file:
            self._file.close()
