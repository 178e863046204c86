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
from typing import Any, Iterable

from hubload.checkpoint import ReaderBase, TensorInfo, canonical_dtype
from hubload.errors import CheckpointError, MissingDependencyError

__all__ = ["KERAS_VAR_ORDER", "KerasWeightsReader"]

# Keras 3 .weights.h5 stores a layer's variables as vars/0, vars/1 ... without their names. The order is
# the layer's variable creation order, which is fixed per layer class; this table names them.
# Keys are Keras class names in snake case (how Keras names container entries: "dense", "conv2d_1").
KERAS_VAR_ORDER: dict[str, tuple[str, ...]] = {
    "dense": ("kernel", "bias"),
    "conv1d": ("kernel", "bias"),
    "conv2d": ("kernel", "bias"),
    "conv3d": ("kernel", "bias"),
    "conv1d_transpose": ("kernel", "bias"),
    "conv2d_transpose": ("kernel", "bias"),
    "conv3d_transpose": ("kernel", "bias"),
    "depthwise_conv1d": ("kernel", "bias"),  # Keras 3 calls the depthwise kernel "kernel" (rank 3/4)
    "depthwise_conv2d": ("kernel", "bias"),
    "separable_conv1d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "embedding": ("embeddings",),
    "layer_normalization": ("gamma", "beta"),
    "group_normalization": ("gamma", "beta"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def _keras_kind(key: str) -> str | None:
    """Layer class (snake case) from a name like ``conv2d_3``; None when unknown."""
    if key in KERAS_VAR_ORDER:
        return key
    base = re.sub(r"_\d+$", "", key)
    return base if base in KERAS_VAR_ORDER else None


def _keras_leaf_names(kinds: Iterable[str | None], shapes: list[tuple[int, ...]]) -> list[str]:
    """Best-effort variable names for one layer's vars/0..n (index strings where unknowable)."""
    n = len(shapes)
    for kind in kinds:
        if kind is None:
            continue
        order = KERAS_VAR_ORDER[kind]
        if kind == "batch_normalization" and n != 4:  # center/scale switched off: positions shift
            break
        if n == len(order):
            return list(order)
        if n == len(order) - 1 and order[-1] == "bias":  # use_bias=False
            return list(order[:-1])
        break
    # Unknown class: a kernel (rank >= 2) optionally followed by a vector bias is the common case.
    if n in (1, 2) and len(shapes[0]) >= 2 and (n == 1 or len(shapes[1]) == 1):
        return ["kernel", "bias"][:n]
    return [str(i) for i in range(n)]


class KerasWeightsReader(ReaderBase):
    """A Keras 3 ``.weights.h5`` file (also the legacy Keras 2 ``.h5`` weight layout), via h5py.

    Keras 3 stores ``<attribute or container path>/vars/<index>``; the variable names are dropped.
    Tensor names here are ``<layer path>/<leaf>``, where ``<leaf>`` comes from :data:`KERAS_VAR_ORDER`
    when the layer class is knowable (from a container key like ``dense_1`` or the stored layer name),
    else ``kernel``/``bias`` for a (rank >= 2, rank-1) pair, else the index itself.

    Limits: layers of classes missing from the table (RNNs, attention, custom layers) keep index leaves;
    a subclassed model's layer stored under an attribute with a renamed class (``name="enc"``) is
    inferred from its shapes only; a BatchNormalization without ``center``/``scale`` keeps indexes.
    Registry rename rules handle the rest.

    Args:
        path: The ``.weights.h5`` / ``.h5`` file.
        layer_names: Replace the ``layers/<class key>`` segments Keras writes for functional/Sequential
            models by the stored layer names (``layers/dense_1`` -> ``d1``), which is how hubload names
            such models' variables. False keeps the raw HDF5 paths.

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
        try:
            if "layer_names" in self._file.attrs or "model_weights" in self._file:
                self._scan_legacy()
            else:
                self._scan(self._file, [], None, layer_names)
        except BaseException:
            self._file.close()
            raise

    def _add(self, name: str, ds: Any) -> None:
        """Record one dataset under ``name``."""
        if name in self._infos:
            raise CheckpointError(f"{self.path}: two variables map to the name {name!r} "
                                  f"({self.sources[name]} and {ds.name}); open with layer_names=False")
        dtype = canonical_dtype(ds.dtype)
        shape = tuple(int(d) for d in ds.shape)
        self._infos[name] = TensorInfo(name, shape, dtype, int(ds.size) * ds.dtype.itemsize)
        self.sources[name] = ds.name

    def _stored_name(self, group: Any) -> str | None:
        """The layer name Keras stored on a group's ``vars`` subgroup."""
        vars_group = group.get("vars")
        if not isinstance(vars_group, self._h5py.Group):
            return None
        stored = vars_group.attrs.get("name")
        return stored.decode() if isinstance(stored, bytes) else stored

    def _scan(self, group: Any, path: list[str], key: str | None, layer_names: bool) -> None:
        """Walk Keras 3 groups; a ``vars`` subgroup holds one layer's variables."""
        h5py = self._h5py
        vars_group = group.get("vars")
        if isinstance(vars_group, h5py.Group) and len(vars_group):
            datasets = [vars_group[k] for k in sorted((k for k in vars_group if k.isdigit()), key=int)]
            stored = self._stored_name(group)
            kinds = [_keras_kind(key) if key else None, _keras_kind(stored) if stored else None]
            leaves = _keras_leaf_names(kinds, [tuple(ds.shape) for ds in datasets])
            kind = next((k for k in kinds if k), None)
            for leaf, ds in zip(leaves, datasets):
                name = "/".join([*path, leaf])
                self._add(name, ds)
                if kind:
                    self.layer_kinds[name] = kind
        for child_key in group:
            child = group[child_key]
            if child_key == "vars" or not isinstance(child, h5py.Group):
                continue
            if child_key == "layers" and layer_names:
                # Functional/Sequential containers: name each sublayer by its stored layer name.
                for sub_key in child:
                    sub = child[sub_key]
                    if isinstance(sub, h5py.Group):
                        self._scan(sub, [*path, self._stored_name(sub) or sub_key], sub_key, layer_names)
            else:
                self._scan(child, [*path, child_key], child_key, layer_names)

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
        return self._file[self.sources[name]][()]

    def close(self) -> None:
        """Close the HDF5 file."""
        if self._file:
            self._file.close()
