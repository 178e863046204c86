"""Assigning checked tensors into a built Keras model, streaming, all or nothing; and the snapshot/rollback that
numeric verification uses.

:func:`apply` checks every matched tensor from metadata, then reads, converts and assigns one tensor (or
group) at a time. Each variable's old value is kept for the rollback: up to :data:`ROLLBACK_IN_MEMORY` as
references to the variables' own buffers (no copy), beyond that spooled to a temporary file just before it is
overwritten, so peak memory stays about a tensor. Re-exported by :mod:`hubload.adapters.tf`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from hubload.adapters import ModelTensor, nothing_loaded_error
from hubload.checkpoint import canonical_dtype, numpy_dtype, to_numpy
from hubload.errors import (
    CheckpointError,
    IncompatibleWeightsError,
    UsageError,
)
from hubload.layout import apply_transform

from hubload.keras_layers import spec_for_mro

logger = logging.getLogger("hubload")

__all__ = ["ROLLBACK_IN_MEMORY", "apply", "checkpoint_values", "restore", "snapshot", "strategy_scope"]


@contextlib.contextmanager
def strategy_scope(model: Any) -> Iterator[None]:
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


def _nbytes(var: Any) -> int:
    """Bytes a variable's value takes."""
    return int(np.prod(var.shape, dtype=np.int64)) * np.dtype(numpy_dtype(canonical_dtype(var.dtype))).itemsize


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
        nbytes = _nbytes(var)
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
        with strategy_scope(model):
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
        layer_spec = spec_for_mro([cls.__name__ for cls in type(layer).__mro__])
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
        from hubload.adapters.tf import spec

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
        with strategy_scope(model):
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



def _rollback_is_free(model: Any) -> bool:
    """True when every variable is a plain ``tf.Variable`` and all of them fit :data:`ROLLBACK_IN_MEMORY`: a
    snapshot is then references to the current buffers (no copy), and a rollback re-points the variables."""
    total = 0
    for var in model.weights:
        if _plain_tf_variable(var) is None:
            return False
        total += _nbytes(var)
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
    from hubload.adapters import keras_behaviour

    return keras_behaviour.checkpoint_values(model, report, reader, spec)


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



