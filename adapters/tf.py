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

Importing this module imports tensorflow and keras; that is the opt-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hubload.adapters import ModelTensor, nothing_loaded_error, call_architecture
from hubload.adapters._keras_paths import attribute_entries, walk
from hubload.checkpoint import ReaderBase, TensorInfo, canonical_dtype, numpy_dtype, to_numpy
from hubload.errors import (
    CheckpointError,
    HubloadError,
    IncompatibleWeightsError,
    RegistryError,
    UnsafeCheckpointError,
    UsageError,
)
from hubload.keras_layers import GroupRule, name_leaf, rnn_group_for, spec_for_mro
from hubload.layout import TF_VARIABLE_SUFFIX, apply_transform, to_canonical

__all__ = [
    "TFCheckpointReader",
    "apply",
    "build",
    "freeze",
    "load_full",
    "load_weights",
    "name",
    "owns",
    "restore_native",
    "spec",
    "to_numpy",
]

logger = logging.getLogger("hubload")

name = "tf"

_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_SLOT_MARKER = "/.OPTIMIZER_SLOT/"
_EXTRA_ROOTS = ("optimizer", "save_counter")  # training state, never model weights


# ---------------------------------------------------------------------------------------------- reader


def _resolve_prefix(path: pathlib.Path) -> pathlib.Path:
    """The checkpoint prefix for a prefix, a ``.index`` file or a checkpoint folder."""
    if path.is_dir():
        latest = tf.train.latest_checkpoint(str(path))
        if latest:
            return pathlib.Path(latest)
        indexes = sorted(path.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_suffix("")
        raise CheckpointError(f"{path}: no TF checkpoint here (no 'checkpoint' file and "
                              f"{len(indexes)} *.index files); pass the checkpoint prefix")
    if path.name.endswith(".index"):
        return path.with_suffix("")
    return path


class TFCheckpointReader(ReaderBase):
    """A ``tf.train.Checkpoint`` (TF2 object-based checkpoint) read by variable name.

    Keys like ``model/dense1/_kernel/.ATTRIBUTES/VARIABLE_VALUE`` become ``dense1/_kernel``: the
    ``/.ATTRIBUTES/VARIABLE_VALUE`` suffix and the root object's segment (the keyword used in
    ``tf.train.Checkpoint(model=...)``) are stripped. Optimizer state (the ``optimizer`` root, Keras 2
    ``.OPTIMIZER_SLOT`` entries) and ``save_counter`` are kept apart in :attr:`extra`.

    Root choice: ``key=`` names it; otherwise a single root is used; with several roots, a checkpoint
    written by ``tf.train.Checkpoint.save`` (it has ``save_counter``) uses the root holding most
    variables, and one without ``save_counter`` is taken to be the model itself (``save_weights`` in
    TF format), so nothing is stripped.

    Args:
        prefix_or_folder: Checkpoint prefix (``ckpt/c-1``), its ``.index`` file, or a folder with a
            ``checkpoint`` state file.
        key: Root object to read (``"model"``, ``"net"``).

    Attributes:
        path: The checkpoint prefix.
        format: "tf-checkpoint".
        layout: "keras".
        root: The stripped root segment ("" when the model is the root).
        roots: Every root segment holding variables -> number of variables.
        sources: Tensor name -> full checkpoint key.
        extra: Training state and other roots' variables: key (suffix stripped) -> TensorInfo.

    Raises:
        CheckpointError: No checkpoint at that path, an unreadable one, or an unknown ``key``.
    """

    format = "tf-checkpoint"
    layout = "keras"

    def __init__(self, prefix_or_folder: str | os.PathLike[str], key: str | None = None) -> None:
        self.path = _resolve_prefix(pathlib.Path(prefix_or_folder))
        try:
            self._reader = tf.train.load_checkpoint(str(self.path))
        except (tf.errors.OpError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: not a readable TF checkpoint "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                  "pass the prefix (the path without .index/.data-*)") from exc
        shapes = self._reader.get_variable_to_shape_map()
        dtypes = self._reader.get_variable_to_dtype_map()

        def info(full: str, short: str) -> TensorInfo:
            shape = tuple(int(d) for d in shapes[full])
            dt = dtypes[full]
            return TensorInfo(short, shape, canonical_dtype(dt), int(np.prod(shape, dtype=np.int64)) * dt.size)

        self._extra_sources: dict[str, str] = {}
        self.extra: dict[str, TensorInfo] = {}
        by_root: dict[str, list[tuple[str, str]]] = {}  # root -> [(full key, key without suffix)]
        for full in sorted(shapes):
            if full == _OBJECT_GRAPH or not full.endswith(TF_VARIABLE_SUFFIX):
                continue  # object graph / serialized configs, not tensors
            short = full[: -len(TF_VARIABLE_SUFFIX)]
            root = short.split("/", 1)[0]
            if root in _EXTRA_ROOTS or _SLOT_MARKER in full:
                self._add_extra(full, info(full, short))
                continue
            by_root.setdefault(root, []).append((full, short))
        self.roots = {r: len(v) for r, v in by_root.items()}

        if key is not None:
            if key not in by_root:
                raise CheckpointError(f"{self.path}: no root object {key!r} holding variables; roots: "
                                      f"{sorted(by_root)}")
            self.root = key
        elif len(by_root) == 1:
            self.root = next(iter(by_root))
        elif not by_root:
            self.root = ""
        elif "save_counter" in self._extra_sources:
            self.root = max(by_root, key=lambda r: (len(by_root[r]), r == "model"))
            logger.info("%s: several root objects %s; reading %r (most variables); pass key= to choose",
                        self.path, sorted(by_root), self.root)
        else:
            self.root = ""

        self.sources: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        for root, entries in by_root.items():
            for full, short in entries:
                if self.root and root != self.root:
                    self._add_extra(full, info(full, short))
                    continue
                tname = short[len(self.root) + 1:] if self.root else short
                self.sources[tname] = full
                self._infos[tname] = info(full, tname)

    def _add_extra(self, full: str, ti: TensorInfo) -> None:
        """Record a non-model tensor."""
        self.extra[ti.name] = ti
        self._extra_sources[ti.name] = full

    @property
    def save_counter(self) -> int | None:
        """The checkpoint's ``save_counter`` (None when it has none)."""
        full = self._extra_sources.get("save_counter")
        return None if full is None else int(self._reader.get_tensor(full))

    def get(self, name: str) -> np.ndarray:
        """Read one model variable as a numpy array.

        Raises:
            CheckpointError: No such variable.
        """
        full = self.sources.get(name)
        if full is None:
            raise CheckpointError(f"{self.path}: no variable named {name!r} under root {self.root!r} "
                                  f"({len(self.sources)} variables; optimizer state is in .extra)")
        return self._reader.get_tensor(full)

    def get_extra(self, name: str) -> np.ndarray:
        """Read one tensor of :attr:`extra` (optimizer state, ``save_counter``, other roots)."""
        full = self._extra_sources.get(name)
        if full is None:
            raise CheckpointError(f"{self.path}: no extra tensor named {name!r}")
        return self._reader.get_tensor(full)

    def close(self) -> None:
        """Nothing to release (TF's reader holds no OS resources beyond the process)."""

    def __repr__(self) -> str:
        return f"<TFCheckpointReader {str(self.path)!r} root={self.root!r} {len(self._infos)} variables>"


# -------------------------------------------------------------------------------------------- protocol


def owns(model: Any) -> bool:
    """True for a Keras layer or model."""
    return isinstance(model, keras.layers.Layer)


def _require_built(model: Any) -> None:
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
    _require_built(model)
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


@contextlib.contextmanager
def _strategy_scope(model: Any) -> Iterator[None]:
    """Enter the strategy the model's variables were created under (unless already inside one)."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        for var in getattr(model, "weights", ())[:1]:
            strategy = getattr(getattr(var, "value", var), "_distribute_strategy", None)
    if strategy is None or tf.distribute.has_strategy() or strategy is tf.distribute.get_strategy():
        yield
        return
    with strategy.scope():
        yield


_TF_ALIGNMENT = 64  # TF/Eigen kernels assume 64-byte aligned buffers; numpy only guarantees 16


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _TF_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % _TF_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _owned_tensor(arr: np.ndarray, dtype: np.dtype) -> Any:
    """One private, aligned C-order copy of ``arr`` (re-layout and cast in one pass), adopted by TF as is.

    ``var.assign(numpy_array)`` copies twice (TF copies every numpy input, then into the variable); a tensor
    made over our own fresh buffer through DLPack is adopted as is. dtypes DLPack cannot carry (bfloat16 from
    ml_dtypes) fall back to the numpy array.
    """
    own = _aligned_empty(arr.shape, dtype)
    np.copyto(own, arr, casting="unsafe")  # the report has already refused value-destroying casts
    try:
        return tf.experimental.dlpack.from_dlpack(own.__dlpack__())
    except (BufferError, TypeError, ValueError, AttributeError, tf.errors.InvalidArgumentError):
        return own


class _TensorSource:
    """Reads checkpoint tensors one at a time, keeping at most one tensor's bytes resident.

    A safetensors file is read with ``readinto`` into one reusable, 64-byte aligned buffer (no memory map, so
    the file's pages never count against the process); other readers hand out their own arrays.
    """

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        header = getattr(reader, "header", None)
        self._stream = header is not None and hasattr(header, "offsets") and hasattr(header, "data_start")
        self._file: Any = None
        self._buf: np.ndarray | None = None

    def get(self, name: str) -> np.ndarray:
        if not self._stream:
            return to_numpy(self.reader.get(name))
        info = self.reader.header.tensors[name]
        begin, end = self.reader.header.offsets[name]
        dtype = numpy_dtype(info.dtype)
        n = end - begin
        if self._buf is None or self._buf.nbytes < n:
            self._buf = None
            self._buf = _aligned_empty((max(n, 1),), np.uint8)
        if self._file is None:
            self._file = open(self.reader.path, "rb")  # noqa: SIM115 - closed in close()
        self._file.seek(self.reader.header.data_start + begin)
        view = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            k = self._file.readinto(view[got:])
            if not k:
                raise CheckpointError(f"{self.reader.path}: file ends inside tensor {name!r} (truncated?)")
            got += k
        return self._buf[:n].view(dtype).reshape(info.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._buf = None


# Old values up to this many bytes are kept as references to the variables' own buffers (free: an ``assign``
# then writes a new buffer); beyond it they are spooled to a temporary file, so a large load stays streaming.
ROLLBACK_IN_MEMORY = 128 * 2**20


def _plain_tf_variable(var: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable when it is a plain (undistributed) one, else None."""
    inner = getattr(var, "value", var)
    if isinstance(inner, tf.Variable) and getattr(inner, "_distribute_strategy", None) is None \
            and hasattr(inner, "read_value"):
        return inner
    return None


class _Spool:
    """Old values of assigned variables, for a rollback without a second copy of the model in memory.

    The first :data:`ROLLBACK_IN_MEMORY` bytes are held as tensors that share the variables' current buffers
    (``read_value`` of a plain ``tf.Variable`` does not copy, and a later ``assign`` then leaves that buffer
    alone), so a small model's rollback costs neither a copy nor a write. The rest is written to a temporary
    file just before each assignment, so peak memory stays about a tensor, not the checkpoint.
    """

    def __init__(self, in_memory: int = ROLLBACK_IN_MEMORY) -> None:
        self._budget = in_memory
        self._file: Any = None
        self._saved: list[tuple[Any, Any, int, tuple[int, ...], np.dtype]] = []

    def save(self, var: Any) -> None:
        nbytes = int(np.prod(var.shape, dtype=np.int64)) * np.dtype(numpy_dtype(canonical_dtype(var.dtype))).itemsize
        inner = _plain_tf_variable(var) if nbytes <= self._budget else None
        if inner is not None:
            self._budget -= nbytes
            self._saved.append((var, inner.read_value(), 0, (), np.dtype("uint8")))
            return
        if self._file is None:
            import tempfile

            self._file = tempfile.TemporaryFile(prefix="hubload-rollback-")  # noqa: SIM115 - closed in close()
        old = np.asarray(var.numpy())
        self._saved.append((var, None, self._file.tell(), old.shape, old.dtype))
        self._file.write(memoryview(np.ascontiguousarray(old)).cast("B"))

    def restore(self, model: Any) -> None:
        with _strategy_scope(model):
            for var, held, offset, shape, dtype in reversed(self._saved):
                if held is not None:
                    var.assign(held)
                    continue
                self._file.seek(offset)
                var.assign(np.fromfile(self._file, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))
                                       ).reshape(shape))

    def close(self) -> None:
        self._saved.clear()
        if self._file is not None:
            self._file.close()


def _after_load(model: Any, assigned: set[int]) -> None:
    """Run the specs' ``after_load`` hooks of layers whose variables were assigned."""
    for layer in model._flatten_layers(include_self=True):
        layer_spec = spec_for_mro(_mro_names(layer))
        if layer_spec is not None and layer_spec.after_load and any(id(w) in assigned for w in layer.weights):
            getattr(layer, layer_spec.after_load)()


def _keras_shape(target: ModelTensor) -> tuple[int, ...]:
    """The Keras shape a canonical tensor takes (its variable's shape)."""
    return target.transform.out_shape(target.shape) if target.transform is not None else tuple(target.shape)


def apply(model: Any, report: Any, reader: Any, *, dtype_policy: str = "model",
          model_spec: Mapping[str, ModelTensor] | None = None, rollback: bool = True) -> None:
    """Assign the report's matched tensors from ``reader`` to the model's variables, all or nothing, streaming.

    First every matched tensor is checked from metadata alone (checkpoint shape through the checkpoint ->
    canonical and canonical -> Keras transforms against the variable's shape; every member of an N-to-M group
    present), so a problem is reported before any variable changes. Then tensors are read, converted, cast and
    assigned one at a time (a group when its last member is read), inside the model's distribution strategy
    scope if any: peak memory is about two tensors, not the checkpoint. Safetensors files are read into one
    reusable buffer, not memory-mapped. If reading or assigning still fails part-way (a file changed on disk,
    out of memory), the variables already assigned are restored from their old values, which were spooled to
    a temporary file just before each assignment, and the error says nothing was changed.

    Args:
        model: A built Keras model.
        report: A :class:`~hubload.compat.CompatReport` from ``check(..., spec(model))``; it must allow
            loading (``raise_if_incompatible`` is called first).
        reader: The checkpoint reader the report was computed from.
        dtype_policy: Only "model": Keras variables have fixed dtypes, tensors are cast to them.
        model_spec: :func:`spec` of the model if the caller has it already (saves walking the model again).
        rollback: Spool old values for a rollback (default). False skips the spool (faster; a failure
            part-way then leaves the model partly loaded, and the error says so).

    Raises:
        IncompatibleWeightsError: The report forbids loading, or a tensor does not fit its variable
            (nothing is assigned then; carries the report), or loading failed part-way (rolled back).
        ValueError: An unsupported ``dtype_policy``.
    """
    if dtype_policy != "model":
        raise UsageError(f"dtype_policy={dtype_policy!r}: Keras variables keep their dtype, only 'model' is "
                         "supported; build the model with the dtype you want")
    report.raise_if_incompatible()
    if model_spec is None:
        model_spec = spec(model)
    targets: dict[str, ModelTensor] = dict(model_spec)
    for t in list(model_spec.values()):  # the alternative forms the checker may have chosen
        if t.alternative is not None:
            targets.update(t.alternative.tensors)
    problems: list[str] = []
    plan: list[tuple[Any, ModelTensor]] = []
    groups: dict[int, tuple[Any, set[str]]] = {}
    infos = reader.tensors()
    for m in report.matched:
        target = targets.get(m.key)
        if target is None:
            problems.append(f"{m.key}: the model has no such variable")
            continue
        if target.ignored:
            continue
        try:
            native = tuple(infos[m.source].shape) if m.source in infos else None
            canon = m.transform.out_shape(native) if (m.transform is not None and native is not None) else native
        except ValueError as exc:
            problems.append(f"{m.key} (checkpoint {m.source!r}): {exc}")
            continue
        if canon is not None and tuple(canon) != tuple(target.shape):
            problems.append(f"{m.key}: checkpoint tensor {m.source!r} becomes shape {list(canon)}, the model "
                            f"expects {list(target.shape)}")
            continue
        if target.group is not None:
            groups.setdefault(id(target.group), (target.group, set()))[1].add(m.key)
        else:
            try:
                keras_shape = _keras_shape(target)
            except ValueError as exc:
                problems.append(f"{m.key}: {exc}")
                continue
            var_shape = tuple(int(d) for d in target.handle.shape)
            if keras_shape != var_shape:
                problems.append(f"{m.key}: becomes shape {list(keras_shape)} in Keras layout, variable "
                                f"{target.native!r} has {list(var_shape)}")
                continue
        plan.append((m, target))
    for binding, got in groups.values():
        missing = sorted(set(binding.members.values()) - got)
        if missing:
            problems.append(f"{binding.layer}: {binding.rule.name} converts its tensors together; the checkpoint "
                            f"lacks {missing} (load all of them, or exclude all of them)")
    if problems:
        raise nothing_loaded_error(reader, model, problems, report, "assigned")

    source = _TensorSource(reader)
    spool = _Spool() if rollback else None
    pending: dict[int, dict[str, np.ndarray]] = {}
    assigned = 0
    assigned_ids: set[int] = set()
    try:
        with _strategy_scope(model):
            for m, target in plan:
                arr = apply_transform(source.get(m.source), m.transform)
                if target.group is None:
                    todo = [(target.handle, apply_transform(arr, target.transform))]
                else:
                    binding = target.group
                    got = pending.setdefault(id(binding), {})
                    got[m.key] = np.array(arr)  # group members are small (RNN/attention), keep a copy
                    if len(got) < len(binding.members):
                        continue
                    if hasattr(binding, "assignments"):
                        todo = [(var, a) for var, a, _ in binding.assignments(pending.pop(id(binding)))]
                    else:
                        todo = [(binding.variables[leaf], a) for leaf, a in binding.to_keras(pending.pop(id(binding))).items()]
                for var, value in todo:
                    if tuple(value.shape) != tuple(int(d) for d in var.shape):
                        raise ValueError(f"{target.name}: converted shape {list(value.shape)} does not fit "
                                         f"variable {var.path} {list(var.shape)}")
                    if spool is not None:
                        spool.save(var)
                    var.assign(_owned_tensor(value, numpy_dtype(canonical_dtype(var.dtype))))
                    assigned_ids.add(id(var))
                    assigned += 1
            _after_load(model, assigned_ids)
    except (OSError, ValueError, MemoryError, CheckpointError, tf.errors.OpError) as exc:
        if spool is not None:
            spool.restore(model)
            state = "the variables already assigned were restored, nothing changed"
        else:
            state = f"{assigned} variable(s) were already assigned (rollback=False)"
        raise IncompatibleWeightsError(f"{getattr(reader, 'path', 'checkpoint')}: loading into "
                                       f"{type(model).__name__} failed part-way ({exc}); {state}",
                                       report=report) from exc
    finally:
        source.close()
        if spool is not None:
            spool.close()
    logger.info("assigned %d variables of %s", assigned, type(model).__name__)


def freeze(model: Any, names: list[str]) -> None:
    """Make the named variables non-trainable (``variable.trainable = False``).

    Args:
        model: A built Keras model.
        names: Canonical names (as in :func:`spec` and the report).

    Raises:
        HubloadError: A name is not one of the model's variables.
    """
    model_spec = spec(model)
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


# ---------------------------------------------------------------------------------------- native paths


def _snapshot(variables: list[Any]) -> list[np.ndarray]:
    """Current values of variables (for rollback)."""
    return [np.array(v.numpy()) for v in variables]


def _rollback(model: Any, variables: list[Any], values: list[np.ndarray]) -> None:
    """Restore variables to snapshot values."""
    with _strategy_scope(model):
        for v, val in zip(variables, values):
            v.assign(val)


def restore_native(model: Any, prefix: str | os.PathLike[str], optimizer: Any = None, *,
                   root: str | None = None) -> Any:
    """Restore a ``tf.train.Checkpoint`` written for the same model class (and optimizer).

    Names are checked first (the same compat check as the cross-framework path, so shape problems
    and variables TF would silently skip are reported before anything changes); then
    ``tf.train.Checkpoint(<root>=model[, optimizer=...]).restore(prefix)`` runs and
    ``assert_existing_objects_matched()`` confirms it. On failure the model and optimizer are rolled
    back to their previous values.

    Args:
        model: A built Keras model of the class that wrote the checkpoint.
        prefix: Checkpoint prefix or folder.
        optimizer: Optimizer to restore as well (built on the model's trainable variables if needed).
        root: Root object name in the checkpoint (default: the reader's choice, usually "model").

    Returns:
        The :class:`~hubload.compat.CompatReport` of the name check.

    Raises:
        IncompatibleWeightsError: The checkpoint does not fit the model/optimizer (carries the report).
        CheckpointError: The checkpoint cannot be read.
    """
    from hubload.compat import check

    reader = TFCheckpointReader(prefix, key=root)
    report = check(to_canonical(reader.tensors(), "keras"), spec(model), source=str(reader.path),
                   target=type(model).__name__)
    report.raise_if_incompatible(strict=True)
    if optimizer is not None and not getattr(optimizer, "built", True):
        optimizer.build(model.trainable_variables)

    variables = list(model.weights) + (list(optimizer.variables) if optimizer is not None else [])
    before = _snapshot(variables)
    kwargs: dict[str, Any] = {}
    if optimizer is not None:
        kwargs["optimizer"] = optimizer
    ckpt = tf.train.Checkpoint(**({reader.root: model} if reader.root else {"root": model}), **kwargs)
    try:
        status = ckpt.restore(str(reader.path))
        status.assert_existing_objects_matched()
        status.expect_partial()  # checkpoint values with no Python object (save_counter ...) are fine
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        _rollback(model, variables, before)
        raise IncompatibleWeightsError(
            f"{reader.path}: tf.train.Checkpoint restore into {type(model).__name__} failed, model and optimizer "
            f"left unchanged: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", report=report) from exc
    logger.info("restored %s natively from %s", type(model).__name__, reader.path)
    return report


def load_weights(model: Any, path: str | os.PathLike[str]) -> None:
    """Load a Keras ``.weights.h5`` saved from the same architecture with ``model.load_weights``.

    Args:
        model: A built Keras model.
        path: The ``.weights.h5`` file.

    Raises:
        IncompatibleWeightsError: Keras could not load it; the model is rolled back unchanged.
        CheckpointError: The file does not exist.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    _require_built(model)
    variables = list(model.weights)
    before = _snapshot(variables)
    try:
        model.load_weights(str(p))
    except (ValueError, KeyError, OSError) as exc:
        _rollback(model, variables, before)
        raise IncompatibleWeightsError(f"{p}: model.load_weights into {type(model).__name__} failed, model left "
                                       f"unchanged: {exc}. Is it a different architecture? Load it by name "
                                       "through the compat check instead.") from exc


def load_full(path: str | os.PathLike[str]) -> Any:
    """Load a whole-model artifact: a SavedModel folder or a ``.keras`` file.

    ``.keras`` files load with ``safe_mode=True``: a ``Lambda`` layer (serialised Python bytecode) is
    refused. A SavedModel is a TF graph program: load only SavedModels from sources you trust.

    Args:
        path: SavedModel folder (holding ``saved_model.pb``) or ``.keras`` file.

    Returns:
        The loaded object (``tf.saved_model.load`` result or a ``keras.Model``).

    Raises:
        UnsafeCheckpointError: The ``.keras`` file needs code execution (Lambda layer, unsafe config).
        CheckpointError: Not a whole-model artifact hubload loads, or unreadable.
    """
    p = pathlib.Path(path)
    if p.is_dir() and (p / "saved_model.pb").is_file():
        try:
            return tf.saved_model.load(str(p))
        except (tf.errors.OpError, ValueError, OSError) as exc:
            raise CheckpointError(f"{p}: cannot load SavedModel: {exc}") from exc
    if p.suffix == ".keras" and p.is_file():
        try:
            return keras.saving.load_model(str(p), safe_mode=True)
        except ValueError as exc:
            msg = str(exc)
            if "safe_mode" in msg or "arbitrary code" in msg:
                raise UnsafeCheckpointError(
                    f"{p}: refused: the model contains code that would run on load (e.g. a Lambda layer); "
                    "do not trust this file. Rebuild the architecture in code and load only its weights "
                    "(.weights.h5 / safetensors).") from exc
            raise CheckpointError(f"{p}: cannot load .keras model: {msg}") from exc
        except (OSError, KeyError, TypeError) as exc:  # TypeError: unknown custom class in the config
            raise CheckpointError(f"{p}: cannot load .keras model: {exc}") from exc
    raise CheckpointError(f"{p}: not a whole-model artifact (expected a SavedModel folder with saved_model.pb "
                          "or a .keras file); weights-only files load into a model you build")


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


from hubload.adapters import keras_behaviour as _behaviour  # noqa: E402
from hubload.adapters.keras_behaviour import (  # noqa: E402  (behaviour checks, see that module)
    describe,
    infer_inputs,
    read_tensor,
    run,
    to_canonical_inputs,
    to_native_inputs,
)


def _rollback_is_free(model: Any) -> bool:
    """True when every variable is a plain ``tf.Variable`` and all of them fit :data:`ROLLBACK_IN_MEMORY`: a
    snapshot is then references to the current buffers (no copy), and a rollback re-points the variables."""
    total = 0
    for var in model.weights:
        if _plain_tf_variable(var) is None:
            return False
        total += int(np.prod(var.shape, dtype=np.int64)) * np.dtype(numpy_dtype(canonical_dtype(var.dtype))).itemsize
    return total <= ROLLBACK_IN_MEMORY


def checkpoint_values(model: Any, report: Any, reader: Any, spec: Mapping[str, Any]) -> dict[int, Any] | None:
    """The checkpoint's values for a verification before the copy, or None to verify after it.

    None when the rollback is free (:func:`_rollback_is_free`): copying, then running the model itself, costs
    less than converting every tensor twice and running it through ``stateless_call`` (MiniLM: about 150 ms
    less), and a failed verification still leaves every variable bit-identical (:func:`restore`). Larger models
    are verified before the copy, so no second copy of them is ever held.
    """
    if _rollback_is_free(model):
        return None
    return _behaviour.checkpoint_values(model, report, reader, spec)


def snapshot(model: Any, names: Sequence[str], spec: Mapping[str, Any]) -> _Spool:
    """The current value of every model variable, for :func:`restore` (references to the buffers up to
    :data:`ROLLBACK_IN_MEMORY`, a temporary file beyond)."""
    spool = _Spool()
    for var in model.weights:
        spool.save(var)
    return spool


def restore(model: Any, snap: _Spool) -> None:
    """Put every variable back as :func:`snapshot` found it."""
    try:
        snap.restore(model)
    finally:
        snap.close()



def collective_load(model: Any) -> bool:
    """Keras loads are per process: under tf.distribute each worker loads its own copy (no vote across workers)."""
    return False


__all__ += ["apply_options", "build_scope", "checkpoint_values", "collective_load", "describe", "dtype_policies",  # noqa: PLE0605
            "infer_inputs", "native_formats", "native_layout", "place", "read_tensor", "restore", "run", "snapshot",
            "to_canonical_inputs", "to_native_inputs"]
