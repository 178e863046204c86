"""Assigning checked tensors into a built Keras model, all or nothing; and the snapshot/rollback that numeric
verification uses.

:func:`apply` checks every matched tensor from metadata first. Then, for a model whose variables fit
:data:`ROLLBACK_IN_MEMORY`, it converts every tensor into a fresh buffer (two threads) while it keeps the old
values as references to the variables' own buffers, and only then assigns, each variable taking its new
buffer over. Larger models stream: read, convert and assign one tensor (or group) at a time, each old value
spooled to a temporary file just before it is overwritten, so peak memory stays about a tensor. Re-exported
by :mod:`hubload.adapters.tf`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
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


def _adopted(own: np.ndarray) -> Any:
    """A TF tensor over ``own`` (a fresh, private, aligned buffer), through DLPack: no copy, and
    ``assign`` then takes the buffer over instead of copying it (the tensor is its buffer's only owner).
    dtypes DLPack cannot carry (bfloat16 from ml_dtypes) fall back to the numpy array (TF copies it)."""
    try:
        return tf.experimental.dlpack.from_dlpack(own.__dlpack__())
    except (BufferError, TypeError, ValueError, AttributeError, tf.errors.InvalidArgumentError):
        return own


def _relayout_into(out: np.ndarray, arr: np.ndarray, transforms: Sequence[Any]) -> None:
    """Write ``transforms`` (each a :class:`~hubload.layout.Transform` or None) of ``arr`` into ``out``, cast
    to its dtype, in one pass: permutations are views, and the trailing reshapes happen on ``out``'s side
    (a fresh C-order buffer reshapes as a view), so nothing in between is materialised.

    Raises:
        ValueError: A transform does not fit the array's shape.
    """
    steps: list[tuple[str, tuple[int, ...]]] = []
    shape = tuple(arr.shape)
    for t in transforms:
        if t is None:
            continue
        shape = t.out_shape(shape)  # validates in_shape and ranks
        steps += [(kind, arg) for kind, arg in (("reshape", t.pre_reshape), ("perm", t.perm), ("reshape", t.reshape))
                  if arg is not None]
    if shape != tuple(out.shape):
        raise ValueError(f"converted shape {list(shape)} does not fit {list(out.shape)}")
    while steps and steps[-1][0] == "reshape":
        steps.pop()
    x = arr
    for kind, arg in steps:
        x = x.reshape(arg) if kind == "reshape" else x.transpose(arg)
    np.copyto(out.reshape(x.shape), x, casting="unsafe")  # the report has already refused value-destroying casts


def _own_copy(arr: np.ndarray, var: Any) -> np.ndarray:
    """A fresh aligned copy of ``arr`` in ``var``'s shape and dtype, for :func:`_adopted`."""
    own = _aligned_empty(*_layout(var))
    _relayout_into(own, arr, ())
    return own


class _TensorSource:
    """Reads checkpoint tensors one at a time, keeping at most one tensor's bytes resident.

    A safetensors file is read with ``readinto`` into one reusable, 64-byte aligned buffer (no memory map, so
    the file's pages never count against the process); other readers hand out their own arrays.
    """

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        header = getattr(reader, "header", None)
        # read by offset from its own file handle (safe on several threads), else from the reader's arrays
        self.streams = header is not None and hasattr(header, "offsets") and hasattr(header, "data_start")
        self._file: Any = None
        self._buf: np.ndarray | None = None

    def can_read_into(self, name: str, out: np.ndarray) -> bool:
        """True when :meth:`get` can read ``name``'s bytes straight into ``out`` (same dtype and size)."""
        if not self.streams:
            return False
        info = self.reader.header.tensors[name]
        begin, end = self.reader.header.offsets[name]
        return np.dtype(numpy_dtype(info.dtype)) == out.dtype and end - begin == out.nbytes

    def get(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """The tensor, in the reusable buffer (valid until the next call), or read into ``into`` (C-order, of
        the tensor's dtype and size, see :meth:`can_read_into`) and returned in the file's shape."""
        if not self.streams:
            return to_numpy(self.reader.get(name))
        info = self.reader.header.tensors[name]
        begin, end = self.reader.header.offsets[name]
        dtype = numpy_dtype(info.dtype)
        n = end - begin
        if into is not None:
            target = into.reshape(-1).view(np.uint8)
        else:
            if self._buf is None or self._buf.nbytes < n:
                self._buf = None
                self._buf = _aligned_empty((max(n, 1),), np.uint8)
            target = self._buf
        if self._file is None:
            self._file = open(self.reader.path, "rb")  # noqa: SIM115 - closed in close()
        self._file.seek(self.reader.header.data_start + begin)
        view = memoryview(target)[:n]
        got = 0
        while got < n:
            k = self._file.readinto(view[got:])
            if not k:
                raise CheckpointError(f"{self.reader.path}: file ends inside tensor {name!r} (truncated?)")
            got += k
        return target[:n].view(dtype).reshape(info.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._buf = None


# Old values up to this many bytes are kept as references to the variables' own buffers (free: an ``assign``
# then writes a new buffer); beyond it they are spooled to a temporary file, so a large load stays streaming.
ROLLBACK_IN_MEMORY = 128 * 2**20


def _layout(var: Any) -> tuple[tuple[int, ...], np.dtype]:
    """A variable's shape and numpy dtype."""
    return tuple(int(d) for d in var.shape), np.dtype(numpy_dtype(canonical_dtype(var.dtype)))


def _nbytes(var: Any) -> int:
    """Bytes a variable's value takes."""
    shape, dtype = _layout(var)
    return math.prod(shape) * dtype.itemsize


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

    def __init__(self, in_memory: int | None = None) -> None:
        self.budget = ROLLBACK_IN_MEMORY if in_memory is None else in_memory
        self._file: Any = None
        self._ids: set[int] = set()
        self._saved: list[tuple[Any, Any, int, tuple[int, ...], np.dtype]] = []

    def save(self, var: Any, nbytes: int | None = None) -> None:
        """Keep ``var``'s current value (once: a second call for the same variable does nothing)."""
        if id(var) in self._ids:
            return
        self._ids.add(id(var))
        nbytes = _nbytes(var) if nbytes is None else nbytes
        inner = _plain_tf_variable(var) if nbytes <= self.budget else None
        if inner is not None:
            self.budget -= nbytes
            self._saved.append((var, inner.value(), 0, (), np.dtype("uint8")))  # one read op, no copy
            return
        if self._file is None:
            import tempfile

            self._file = tempfile.TemporaryFile(prefix="hubload-rollback-")  # noqa: SIM115 - closed in close()
        old = np.asarray(var.numpy())
        self._saved.append((var, None, self._file.tell(), old.shape, old.dtype))
        self._file.write(memoryview(np.ascontiguousarray(old).reshape(-1).view(np.uint8)))  # bytes: any dtype (bfloat16)

    def restore(self, model: Any, only: set[int] | None = None) -> None:
        """Put the saved values back (of the variables whose id is in ``only``, if given)."""
        with strategy_scope(model):
            for var, held, offset, shape, dtype in reversed(self._saved):
                if only is not None and id(var) not in only:
                    continue
                if held is not None:
                    var.assign(held)
                    continue
                self._file.seek(offset)
                var.assign(np.fromfile(self._file, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))
                                       ).reshape(shape))

    def close(self) -> None:
        self._saved.clear()
        self._ids.clear()
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
    """Assign the report's matched tensors from ``reader`` to the model's variables, all or nothing.

    First every matched tensor is checked from metadata alone (checkpoint shape through the checkpoint ->
    canonical and canonical -> Keras transforms against the variable's shape; every member of an N-to-M group
    present), so a problem is reported before any variable changes. Then, inside the model's distribution
    strategy scope if any:

    - plain variables within :data:`ROLLBACK_IN_MEMORY`, from a safetensors file: every tensor is converted
      first (:func:`_convert_then_assign`), then assigned; old values are held as buffer references;
    - otherwise tensors are read, converted, cast and assigned one at a time (a group when its last member is
      read; :func:`_stream`): peak memory is about two tensors, not the checkpoint, and old values beyond the
      in-memory budget are spooled to a temporary file just before each assignment.

    Safetensors files are read with ``readinto``, not memory-mapped. If reading or assigning still fails
    part-way (a file changed on disk, out of memory), the variables already assigned are restored and the
    error says nothing was changed.

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

    spool = _Spool() if rollback else None
    assigned_ids: set[int] = set()
    try:
        with strategy_scope(model):
            layouts = _in_memory(plan, reader, spool) if spool is not None else None
            if layouts is not None:
                _convert_then_assign(plan, reader, spool, assigned_ids, layouts)
            else:
                _stream(plan, reader, spool, assigned_ids)
            _after_load(model, assigned_ids)
    except (OSError, ValueError, MemoryError, CheckpointError, tf.errors.OpError) as exc:
        if spool is not None:
            spool.restore(model, assigned_ids)
            state = "the variables already assigned were restored, nothing changed"
        else:
            state = f"{len(assigned_ids)} variable(s) were already assigned (rollback=False)"
        raise IncompatibleWeightsError(f"{getattr(reader, 'path', 'checkpoint')}: loading into "
                                       f"{type(model).__name__} failed part-way ({exc}); {state}",
                                       report=report) from exc
    finally:
        if spool is not None:
            spool.close()
    logger.info("assigned %d variables of %s", len(assigned_ids), type(model).__name__)


Todo = list[tuple[Any, np.ndarray]]


def _convert(m: Any, target: ModelTensor, source: _TensorSource, pending: dict[int, dict[str, np.ndarray]],
             layout: tuple[tuple[int, ...], np.dtype] | None = None) -> Todo | None:
    """Read and convert one matched tensor: (variable, fresh Keras-layout array) pairs to assign, or None while
    an N-to-M group still waits for members. ``layout``: the variable's :func:`_layout`, if known."""
    if target.group is None:
        var = target.handle
        own = _aligned_empty(*(layout or _layout(var)))
        if m.transform is None and target.transform is None and source.can_read_into(m.source, own):
            source.get(m.source, into=own)  # the bytes go straight into the variable's new buffer
        else:
            _relayout_into(own, source.get(m.source), (m.transform, target.transform))
        return [(var, own)]
    arr = apply_transform(source.get(m.source), m.transform)
    binding = target.group
    got = pending.setdefault(id(binding), {})
    got[m.key] = np.array(arr)  # group members are small (RNN/attention), keep a copy
    if len(got) < len(binding.members):
        return None
    if hasattr(binding, "assignments"):
        todo = [(var, a) for var, a, _ in binding.assignments(pending.pop(id(binding)))]
    else:
        todo = [(binding.variables[leaf], a) for leaf, a in binding.to_keras(pending.pop(id(binding))).items()]
    for var, a in todo:
        if tuple(a.shape) != tuple(int(d) for d in var.shape):
            raise ValueError(f"{target.name}: converted shape {list(a.shape)} does not fit variable {var.path} "
                             f"{list(var.shape)}")
    return [(var, _own_copy(a, var)) for var, a in todo]


def _assign(var: Any, value: np.ndarray, *, adopt: bool = True) -> None:
    """``var.assign(value)``. A plain ``tf.Variable`` outside a Keras stateless scope is assigned with the one op
    Keras' ``assign`` ends in (shape and dtype are already checked: a fifth of its Python cost); anything else
    goes through Keras.

    ``adopt``: the variable takes ``value``'s buffer over (no copy). False: TF copies ``value`` into memory of
    its own allocator first, as the streaming path needs. TF keeps a variable's freed buffer in its allocator
    for reuse rather than returning it to the system, so a variable that adopted an outside buffer left its
    old one held: peak RSS grew by the whole checkpoint (bench row 11: 1.13x). A copy made by TF reuses the
    buffer the previous variable gave back, and the growth stays about a tensor.
    """
    tensor = _adopted(value) if adopt else tf.constant(value)
    inner = _plain_tf_variable(var)
    if inner is not None and isinstance(tensor, tf.Tensor) and tensor.dtype == inner.dtype \
            and not _in_stateless_scope():
        tf.raw_ops.AssignVariableOp(resource=inner.handle, value=tensor)
    else:
        var.assign(tensor)


def _in_stateless_scope() -> bool:
    try:
        from keras.src.backend.common.stateless_scope import in_stateless_scope
    except ImportError:  # a Keras without it: take the Keras path, always right
        return True
    return bool(in_stateless_scope())


def _stream(plan: Sequence[tuple[Any, ModelTensor]], reader: Any, spool: _Spool | None,
            assigned: set[int]) -> None:
    """Read, convert and assign one tensor (or group) at a time: peak memory about two tensors."""
    source = _TensorSource(reader)
    pending: dict[int, dict[str, np.ndarray]] = {}
    try:
        for m, target in plan:
            for var, value in _convert(m, target, source, pending) or ():
                if spool is not None:
                    spool.save(var)
                _assign(var, value, adopt=False)
                assigned.add(id(var))
    finally:
        source.close()


def _in_memory(plan: Sequence[tuple[Any, ModelTensor]], reader: Any, spool: _Spool
               ) -> dict[int, tuple[tuple[int, ...], np.dtype]] | None:
    """The :func:`_layout` of each single variable (by plan index) when every variable to assign is a plain
    ``tf.Variable``, all of them fit the spool's in-memory budget, and the file can be read from several
    threads: the old buffers are kept anyway, so the new ones can all be prepared before the first assign.
    Else None."""
    if not _TensorSource(reader).streams:
        return None
    layouts: dict[int, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    for i, (_, target) in enumerate(plan):
        if target.group is not None:
            continue
        if _plain_tf_variable(target.handle) is None:
            return None
        layouts[i] = shape, dtype = _layout(target.handle)
        total += math.prod(shape) * dtype.itemsize
    return layouts if total <= spool.budget else None


def _workers() -> int:
    """Threads converting on the in-memory path, this one included: the cores this process may use, up to 2."""
    try:
        return max(1, min(2, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(2, os.cpu_count() or 1))


def _convert_then_assign(plan: Sequence[tuple[Any, ModelTensor]], reader: Any, spool: _Spool,
                         assigned: set[int], layouts: dict[int, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Convert every tensor first, then assign them all; a failure while converting leaves the model untouched.

    Reading and re-laying out (file reads and numpy copies release the GIL) run on a worker thread while this
    thread takes the rollback references and converts the groups (RNN, fused attention); then this thread
    takes tensors from the same queue, largest first, so both cores convert. Each thread reads by its own file
    handle into its own buffer.

    The file is read, not memory-mapped: mapped pages faulted in by the threads contend with the fresh
    buffers' faults for the process's memory-map lock, which measured 1.5x slower here (MiniLM, 2 cores).
    """
    results: list[Todo | None] = [None] * len(plan)
    nbytes = {i: math.prod(shape) * dtype.itemsize for i, (shape, dtype) in layouts.items()}
    queue = sorted(nbytes, key=lambda i: -nbytes[i])
    lock = threading.Lock()
    errors: list[BaseException] = []

    def drain() -> None:
        source = _TensorSource(reader)
        try:
            while not errors:
                with lock:
                    if not queue:
                        return
                    i = queue.pop(0)
                m, target = plan[i]
                results[i] = _convert(m, target, source, {}, layouts[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)
        finally:
            source.close()

    threads = [threading.Thread(target=drain, name="hubload-convert", daemon=True)
               for _ in range(_workers() - 1)]
    for t in threads:
        t.start()
    try:
        for i in nbytes:
            spool.save(plan[i][1].handle, nbytes[i])
        source = _TensorSource(reader)
        pending: dict[int, dict[str, np.ndarray]] = {}
        try:
            for i, (m, target) in enumerate(plan):
                if target.group is not None:
                    results[i] = _convert(m, target, source, pending)
        finally:
            source.close()
        drain()
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    for todo in results:
        for var, value in todo or ():
            spool.save(var)
            _assign(var, value)
            assigned.add(id(var))


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



