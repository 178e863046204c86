"""TensorFlow checkpoints and Keras' own files: :class:`TFCheckpointReader` reads ``tf.train.Checkpoint`` files by
name (model variables apart from optimizer state and ``save_counter``); the native paths restore artifacts
made by the same model class.

* :func:`restore_native` – ``tf.train.Checkpoint(...).restore`` + ``assert_existing_objects_matched``,
  optimizer included;
* :func:`load_weights` – ``model.load_weights`` for a ``.weights.h5``;
* :func:`load_full` – whole-model artifacts (SavedModel folders, ``.keras`` files with ``safe_mode=True``).

The native loaders roll the model back to its previous values if loading fails part-way. Re-exported by
:mod:`hubload.adapters.tf`.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hubload.checkpoint import ReaderBase, TensorInfo, canonical_dtype
from hubload.errors import (
    CheckpointError,
    IncompatibleWeightsError,
    UnsafeCheckpointError,
)
from hubload.layout import TF_VARIABLE_SUFFIX, to_canonical

logger = logging.getLogger("hubload")
from hubload.adapters.keras_apply import strategy_scope

__all__ = ["TFCheckpointReader", "load_full", "load_weights", "restore_native"]

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



# ---------------------------------------------------------------------------------------- native paths


def _snapshot(variables: list[Any]) -> list[np.ndarray]:
    """Current values of variables (for rollback)."""
    return [np.array(v.numpy()) for v in variables]


def _rollback(model: Any, variables: list[Any], values: list[np.ndarray]) -> None:
    """Restore variables to snapshot values."""
    with strategy_scope(model):
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
    from hubload.adapters.tf import spec

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
    from hubload.adapters.tf import require_built

    require_built(model)
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


