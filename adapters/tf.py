"""TensorFlow/Keras adapter: read TF checkpoints, describe a Keras model, load weights into it.

Protocol (shared with :mod:`hubload.adapters.torch`, see :mod:`hubload.adapters`):

* :func:`owns` – ``isinstance(model, keras.layers.Layer)`` (``keras.Model`` included).
* :func:`spec` – the model's variables by their natural paths
  (:func:`~hubload.adapters._keras_paths.keras_variable_paths`: ``dense1/kernel`` for subclassed
  models, layer names for functional/Sequential ones), translated to canonical names and shapes with
  :mod:`hubload.layout`'s rule table (``dense1/kernel`` ``[in, out]`` -> ``dense1.weight``
  ``[out, in]``). Each entry keeps the variable and the canonical -> Keras transform.
* :func:`apply` – converts every matched tensor first (checkpoint -> canonical transform from the
  report, canonical -> Keras transform, cast), then assigns them all in one pass, inside the model's
  distribution strategy scope when it has one.
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
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hubload.adapters import ModelTensor, _nothing_loaded_error, call_architecture
from hubload.adapters._keras_paths import keras_variable_owners
from hubload.checkpoint import ReaderBase, TensorInfo, canonical_dtype, numpy_dtype, to_numpy
from hubload.errors import (
    CheckpointError,
    HubloadError,
    IncompatibleWeightsError,
    RegistryError,
    UnsafeCheckpointError,
)
from hubload.layout import (
    KERAS_LAYER_RULES,
    TF_VARIABLE_SUFFIX,
    apply_transform,
    keras_name_to_canonical,
    layer_kind,
    to_canonical,
)

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
        raise HubloadError(f"{type(model).__name__} is not built (it has no variables yet); build it first, "
                           "e.g. call it once on a sample input (model(x)) or model.build(input_shape)")


def _known_layer_class(layer: Any) -> str | None:
    """The nearest class in the layer's MRO that the layout table knows (subclasses of Conv2D included)."""
    for cls in type(layer).__mro__:
        if layer_kind(cls.__name__) in KERAS_LAYER_RULES:
            return cls.__name__
    return None


def spec(model: Any) -> dict[str, ModelTensor]:
    """The model's variables as canonical tensor specs.

    Args:
        model: A built Keras model or layer.

    Returns:
        Canonical name -> :class:`~hubload.adapters.ModelTensor` (``native``: Keras path, ``handle``:
        the variable, ``transform``: canonical -> Keras).

    Raises:
        HubloadError: The model is not built, or two variables map to one canonical name.
    """
    _require_built(model)
    out: dict[str, ModelTensor] = {}
    for path, (var, owner) in keras_variable_owners(model).items():
        shape = tuple(int(d) for d in var.shape)
        canonical, fwd, rule = keras_name_to_canonical(path, shape, layer=_known_layer_class(owner))
        if canonical in out:
            raise HubloadError(f"{type(model).__name__}: variables {out[canonical].native!r} and {path!r} both "
                               f"map to canonical name {canonical!r}")
        cshape = fwd.out_shape(shape) if fwd is not None else shape
        out[canonical] = ModelTensor(canonical, cshape, canonical_dtype(var.dtype), path,
                                     fwd.inverse() if fwd is not None else None, rule, var)
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


def apply(model: Any, report: Any, reader: Any, *, dtype_policy: str = "model",
          model_spec: Mapping[str, ModelTensor] | None = None) -> None:
    """Assign the report's matched tensors from ``reader`` to the model's variables, all or nothing.

    Every tensor is converted (checkpoint -> canonical transform from the report, canonical -> Keras
    transform from :func:`spec`, cast to the variable's dtype) before the first assignment; then all
    are assigned in one pass inside the model's distribution strategy scope, if any.

    Args:
        model: A built Keras model.
        report: A :class:`~hubload.compat.CompatReport` from ``check(..., spec(model))``; it must allow
            loading (``raise_if_incompatible`` is called first).
        reader: The checkpoint reader the report was computed from.
        dtype_policy: Only "model": Keras variables have fixed dtypes, tensors are cast to them.
        model_spec: :func:`spec` of the model if the caller has it already (saves walking the model again).

    Raises:
        IncompatibleWeightsError: The report forbids loading, or a tensor does not fit its variable
            (nothing is assigned then; carries the report).
        ValueError: An unsupported ``dtype_policy``.
    """
    if dtype_policy != "model":
        raise ValueError(f"dtype_policy={dtype_policy!r}: Keras variables keep their dtype, only 'model' is "
                         "supported; build the model with the dtype you want")
    report.raise_if_incompatible()
    if model_spec is None:
        model_spec = spec(model)
    pending: list[tuple[Any, np.ndarray]] = []
    problems: list[str] = []
    for m in report.matched:
        target = model_spec.get(m.key)
        if target is None:
            problems.append(f"{m.key}: the model has no such variable")
            continue
        var = target.handle
        try:
            arr = apply_transform(to_numpy(reader.get(m.source)), m.transform)
            arr = apply_transform(arr, target.transform)
        except ValueError as exc:
            problems.append(f"{m.key} (checkpoint {m.source!r}): {exc}")
            continue
        var_shape = tuple(int(d) for d in var.shape)
        if tuple(arr.shape) != var_shape:
            problems.append(f"{m.key}: checkpoint tensor {m.source!r} becomes shape {list(arr.shape)} in Keras "
                            f"layout, variable {target.native!r} has {list(var_shape)}")
            continue
        # Views only so far: every shape is checked before the first variable changes (all or nothing), and
        # each tensor is materialised just before its own assignment, so peak memory stays one tensor.
        pending.append((var, arr))
    if problems:
        raise _nothing_loaded_error(reader, model, problems, report, "assigned")
    with _strategy_scope(model):
        for var, arr in pending:
            var.assign(_owned_tensor(arr, numpy_dtype(canonical_dtype(var.dtype))))
    logger.info("assigned %d variables of %s", len(pending), type(model).__name__)


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
        raise HubloadError(f"{type(model).__name__}: cannot freeze {unknown[:5]}: no such variable")
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


from hubload.adapters.keras_behaviour import (  # noqa: E402  (behaviour checks, see that module)
    checkpoint_values,
    describe,
    infer_inputs,
    read_tensor,
    restore,
    run,
    snapshot,
    to_canonical_inputs,
    to_native_inputs,
)

__all__ += ["apply_options", "build_scope", "checkpoint_values", "describe", "dtype_policies",  # noqa: PLE0605
            "infer_inputs", "native_formats", "native_layout", "place", "read_tensor", "restore", "run", "snapshot",
            "to_canonical_inputs", "to_native_inputs"]
