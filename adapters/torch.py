"""PyTorch adapter: read ``.pt`` pickles safely, describe a ``nn.Module``, load weights into it.

Protocol (shared with :mod:`hubload.adapters.tf`, see :mod:`hubload.adapters`):

* :func:`owns` – ``isinstance(model, torch.nn.Module)``.
* :func:`spec` – ``state_dict()`` keys (parameters and persistent buffers) with canonical shapes and
  dtypes; the canonical layout *is* the PyTorch one, so no transform is needed on this side. Works on
  ``meta``-device models; no tensor data is touched.
* :func:`apply` – copies exactly the report's matched tensors with ``load_state_dict(strict=False)``.
  Every tensor is read, re-laid-out (checkpoint -> canonical transform from the report) and cast
  *before* the first copy, so a bad tensor leaves the model untouched. A model on the ``meta`` device
  is materialised with ``assign=True`` straight from the memory-mapped checkpoint (no second copy
  when no transform or cast is needed).
* :func:`build` – ``"package.module:callable"`` + config.
* :func:`freeze` (extra, used by ``hubload.load(freeze=...)``) – ``requires_grad_(False)`` by name.

:class:`TorchPickleReader` opens ``.pt``/``.pth``/``.bin`` files with
``torch.load(weights_only=True, mmap=True)`` only: a file whose pickle needs any other global is
refused (:class:`~hubload.errors.UnsafeCheckpointError`), never loaded "just this once".

Importing this module imports torch; that is the opt-in.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from hubload.adapters import ModelTensor, nothing_loaded_error, call_architecture
from hubload.checkpoint import ReaderBase, TensorInfo, canonical_dtype
from hubload.distributed import process_group
from hubload.errors import (
    CheckpointError,
    IncompatibleWeightsError,
    RegistryError,
    UnsafeCheckpointError,
    UsageError,
)
from hubload.layout import Transform
from hubload.readers import ShardedReader
from hubload.safetensors_io import SafetensorsReader

__all__ = [
    "NESTED_STATE_DICT_KEYS",
    "TorchPickleReader",
    "apply",
    "build",
    "collective_load",
    "freeze",
    "name",
    "owns",
    "relayout",
    "spec",
    "to_torch",
]

logger = logging.getLogger("hubload")

name = "torch"

# Where training scripts usually nest the weights (Lightning, plain scripts, DDP wrappers), in the
# order they are tried when the top level is not itself a tensor dict.
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


# ---------------------------------------------------------------------------------------------- reader


def _safe_load(path: pathlib.Path) -> Any:
    """``torch.load`` with weights_only (mmap when the file is a zip-format checkpoint)."""
    use_mmap = zipfile.is_zipfile(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
        except RuntimeError as exc:
            if not use_mmap or "mmap" not in str(exc):
                raise
            # Legacy (pre-1.6, non-zip) serialisation cannot be memory-mapped; same safety without it.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = _GLOBAL_RE.search(msg)
        what = f"the global {found.group(1)!r}" if found else "pickle content that weights_only forbids"
        raise UnsafeCheckpointError(
            f"{path}: refused: the pickle references {what}, so loading it could run arbitrary code. "
            "Do not trust this file. Use a safetensors version of the weights, or convert this file "
            "only in an isolated environment if you trust where it came from.") from exc
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file") from exc
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                              "the file may be truncated or in another format — download it again") from exc


def _tensor_count(obj: Any) -> int:
    """Number of tensor values directly in a mapping (0 for anything else)."""
    if not isinstance(obj, Mapping):
        return 0
    return sum(isinstance(v, torch.Tensor) for v in obj.values())


def _select(obj: Any, key: str | None, path: pathlib.Path) -> tuple[str | None, Mapping[str, Any]]:
    """Pick the state dict inside a loaded checkpoint: (key used, mapping)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors; "
                              "hubload loads state dicts (torch.save(model.state_dict(), ...))")
    if key is not None:
        current: Any = obj
        for part in key.split("/"):
            if not isinstance(current, Mapping) or part not in current:
                have = sorted(str(k) for k in current) if isinstance(current, Mapping) else []
                raise CheckpointError(f"{path}: no entry {part!r} for key={key!r}; top-level entries: {have}")
            current = current[part]
        if _tensor_count(current) == 0:
            raise CheckpointError(f"{path}: entry {key!r} holds no tensors; choose another key=")
        return key, current
    if _tensor_count(obj):
        return None, obj
    for candidate in NESTED_STATE_DICT_KEYS:
        inner = obj.get(candidate)
        if _tensor_count(inner):
            return candidate, inner
        for deeper in NESTED_STATE_DICT_KEYS:  # {"model": {"state_dict": ...}}
            if isinstance(inner, Mapping) and _tensor_count(inner.get(deeper)):
                return f"{candidate}/{deeper}", inner[deeper]
    raise CheckpointError(f"{path}: no tensors at the top level or under any of {list(NESTED_STATE_DICT_KEYS)}; "
                          f"top-level entries: {sorted(str(k) for k in obj)}. Pass key=... to choose one")


class TorchPickleReader(ReaderBase):
    """A PyTorch pickle checkpoint opened with ``weights_only=True`` and memory-mapped.

    Args:
        path: The ``.pt``/``.pth``/``.bin``/``.ckpt`` file.
        key: Entry holding the state dict when the file stores a dict of things ("state_dict",
            "model", nested as "model/state_dict"). Without it, the top level is used if it holds
            tensors, else the first of :data:`NESTED_STATE_DICT_KEYS` that does.

    Attributes:
        path: The file.
        format: "torch".
        layout: "torch".
        key: The nested key the tensors came from (None for a flat state dict).
        skipped: Non-tensor entries of the state dict, left out.
        other_entries: Top-level entries next to the chosen key ("epoch", "optimizer" ...).

    Raises:
        UnsafeCheckpointError: The pickle needs globals beyond tensors and containers.
        CheckpointError: Unreadable file, or no dict of tensors in it.
    """

    format = "torch"
    layout = "torch"

    def __init__(self, path: str | os.PathLike[str], key: str | None = None) -> None:
        self.path = pathlib.Path(path)
        obj = _safe_load(self.path)
        self.key, state = _select(obj, key, self.path)
        if self.key is not None:
            logger.info("%s: using the state dict under %r", self.path, self.key)
        top = self.key.split("/")[0] if self.key else None
        self.other_entries = sorted(str(k) for k in obj if k != top) if self.key else []
        self._tensors: dict[str, torch.Tensor] | None = {}
        self._offsets: dict[str, int | None] | None = None
        self.skipped: list[str] = []
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                self._tensors[str(k)] = v
            else:
                self.skipped.append(str(k))
        if self.skipped:
            logger.info("%s: skipped %d non-tensor entries (%s)", self.path, len(self.skipped),
                        ", ".join(self.skipped[:5]))

    def _live(self) -> dict[str, torch.Tensor]:
        """The tensor dict, or an error once closed."""
        if self._tensors is None:
            raise CheckpointError(f"{self.path}: reader is closed")
        return self._tensors

    def _table(self) -> dict[str, torch.Tensor]:
        """``in`` and ``len()`` answer from the tensor dict (no TensorInfo built) and fail once closed."""
        return self._live()

    def tensors(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes from the tensors' metadata (no data pages touched)."""
        return {k: TensorInfo(k, tuple(t.shape), canonical_dtype(t.dtype), t.numel() * t.element_size())
                for k, t in self._live().items()}

    def get(self, name: str) -> torch.Tensor:
        """Return one tensor (CPU, backed by the memory-mapped file; copy-on-write, never written back).

        Raises:
            CheckpointError: No such tensor, or the reader is closed.
        """
        tensors = self._live()
        if name not in tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} in this PyTorch checkpoint "
                                  f"({len(tensors)} tensors)")
        return tensors[name]

    def data_offset(self, name: str) -> int | None:
        """File offset of tensor ``name``'s first byte, when its bytes can be read straight from the file.

        True of zip-format checkpoints (``torch.save`` since 1.6): each storage is an uncompressed zip record,
        and a contiguous little-endian tensor is a plain row-major block inside it, so a rank of a sharded
        model can ``pread`` its box like a safetensors tensor. The offsets come from a second, data-free
        ``torch.load(map_location="meta", weights_only=True)``, which records where each storage begins.

        Returns:
            The offset, or None (legacy format, compressed or big-endian records, a non-contiguous view):
            then the tensor is sliced from the memory map instead.
        """
        self._live()
        if self._offsets is None:
            self._offsets = self._file_offsets()
        return self._offsets.get(name)

    def _file_offsets(self) -> dict[str, int | None]:
        """name -> file offset of the first byte (None where a direct read is not safe)."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
                order = [i for i in infos if i.filename.endswith("/byteorder")]
                if order and zf.read(order[0]).strip() != sys.byteorder.encode():
                    return {}
            if sys.byteorder != "little" or any("/data/" in i.filename and i.compress_type != zipfile.ZIP_STORED
                                                for i in infos):
                return {}
            obj = torch.load(self.path, map_location="meta", weights_only=True)
            _, state = _select(obj, self.key, self.path)
        except (zipfile.BadZipFile, OSError, RuntimeError, pickle.UnpicklingError, CheckpointError):
            return {}
        out: dict[str, int | None] = {}
        for k, v in state.items():
            base = getattr(v.untyped_storage(), "_checkpoint_offset", None) if isinstance(v, torch.Tensor) else None
            out[str(k)] = base + v.storage_offset() * v.element_size() if base is not None and v.is_contiguous() \
                else None
        return out

    def close(self) -> None:
        """Drop the references (tensors already handed out stay valid)."""
        self._tensors = None

    def __repr__(self) -> str:
        return f"<TorchPickleReader {str(self.path)!r} key={self.key!r}>"


# ----------------------------------------------------------------------------------- tensor conversion


class _FileStorages:
    """One torch storage per safetensors file, shared by all its tensors.

    ``get`` is a private copy-on-write map that a model may own (``assign=True``); ``readonly`` wraps the
    reader's own read-only map for tensors that are only copied from (one ``from_numpy`` per file instead of
    one per tensor).
    """

    def __init__(self) -> None:
        self._maps: dict[pathlib.Path, torch.UntypedStorage] = {}
        self._readonly: dict[SafetensorsReader, torch.UntypedStorage] = {}

    def get(self, path: pathlib.Path) -> torch.UntypedStorage:
        """The (private, copy-on-write) mapping of ``path``."""
        if path not in self._maps:
            # shared=False maps the file MAP_PRIVATE, as torch.load(mmap=True) does: zero copy until written.
            self._maps[path] = torch.UntypedStorage.from_file(str(path), shared=False,
                                                              nbytes=os.path.getsize(path))
        return self._maps[path]

    def readonly(self, reader: SafetensorsReader) -> torch.UntypedStorage:
        """Storage over ``reader``'s read-only map of its file (valid while this object lives)."""
        whole = self._readonly.get(reader)  # keyed by the reader (identity): its map, and no Path hashing per tensor
        if whole is None:
            with warnings.catch_warnings():
                # from_numpy warns on read-only memory; these tensors are only copied from, never written.
                warnings.simplefilter("ignore", UserWarning)
                whole = self._readonly[reader] = torch.from_numpy(reader.buffer()).untyped_storage()
        return whole


_torch_dtypes: dict[str, torch.dtype] = {}  # canonical name -> torch dtype, filled as names are seen


def _torch_dtype(dtype_name: str) -> torch.dtype:
    """torch dtype for a canonical dtype name."""
    dt = _torch_dtypes.get(dtype_name)
    if dt is None:
        dt = getattr(torch, dtype_name, None)
        if not isinstance(dt, torch.dtype):
            raise CheckpointError(f"dtype {dtype_name!r} has no PyTorch equivalent")
        _torch_dtypes[dtype_name] = dt
    return dt


def _from_safetensors(reader: Any, tensor_name: str, storages: _FileStorages, owned: bool) -> torch.Tensor | None:
    """Zero-copy tensor from a safetensors file behind ``reader``, or None if it is not one.

    ``owned``: from the copy-on-write map a model may keep; else from the reader's read-only map.
    """
    if isinstance(reader, ShardedReader):
        return _from_safetensors(reader.shards[reader.shard_of(tensor_name)], tensor_name, storages, owned)
    if not isinstance(reader, SafetensorsReader):
        return None
    header = reader.header
    info = header.tensors.get(tensor_name)
    if info is None:
        return None
    dtype = _torch_dtype(info.dtype)
    begin, end = header.offsets[tensor_name]
    start = header.data_start + begin
    itemsize = dtype.itemsize
    if end == begin:
        return torch.zeros(info.shape, dtype=dtype)
    whole = storages.get(reader.path) if owned else storages.readonly(reader)
    if start % itemsize:  # unaligned data (non-standard writer): take a copy of just this tensor
        raw = torch.empty(0, dtype=torch.uint8).set_(whole)[start:start + (end - begin)].clone()
        return raw.view(dtype).reshape(info.shape)
    return torch.empty(0, dtype=dtype).set_(whole, start // itemsize, info.shape)


def _from_numpy(array: Any) -> tuple[torch.Tensor, bool]:
    """torch view of a numpy array: (tensor, True if the memory is read-only)."""
    import numpy as np

    array = np.asarray(array)
    readonly = not array.flags.writeable
    dtype_name = canonical_dtype(array.dtype)
    if not array.flags.c_contiguous and not array.flags.f_contiguous:
        array, readonly = np.ascontiguousarray(array), False
    if array.dtype.kind == "V" or dtype_name in ("bfloat16",) or dtype_name.startswith("float8"):
        # ml_dtypes types are unknown to torch.from_numpy: reinterpret the bytes.
        raw = array.view(f"uint{8 * array.dtype.itemsize}")
        out, ro = _from_numpy(raw)
        return out.view(_torch_dtype(dtype_name)), ro
    with warnings.catch_warnings():
        # from_numpy warns on read-only memory; callers only read it, or clone it first (see apply).
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array), readonly


def to_torch(reader: Any, tensor_name: str, *, _storages: _FileStorages | None = None,
             owned: bool = True) -> tuple[torch.Tensor, bool]:
    """Read one checkpoint tensor as a CPU ``torch.Tensor``, without copying where possible.

    Args:
        reader: A :class:`~hubload.readers.CheckpointReader`.
        tensor_name: The tensor's native name in the checkpoint.
        owned: The tensor may become a model's own (``assign=True``): safetensors data then comes from a
            private copy-on-write torch storage over the file. False (the data is only copied from): a view
            of the reader's own read-only map (the copy faults its pages in).

    Returns:
        ``(tensor, readonly)``: ``readonly`` is True when the tensor shares read-only memory (a
        numpy memory map) and must be cloned before a model may own it.
    """
    t = _from_safetensors(reader, tensor_name, _storages or _FileStorages(), owned)
    if t is not None:
        return t, not owned
    data = reader.get(tensor_name)
    if isinstance(data, torch.Tensor):
        return data, False
    return _from_numpy(data)


def relayout(tensor: torch.Tensor, transform: Transform | None) -> torch.Tensor:
    """Apply a :class:`~hubload.layout.Transform` to a torch tensor (views; no copy by itself).

    Raises:
        ValueError: The tensor's shape does not fit the transform.
    """
    if transform is None:
        return tensor
    if transform.in_shape is not None and tuple(tensor.shape) != tuple(transform.in_shape):
        raise ValueError(f"transform built for shape {list(transform.in_shape)} got {list(tensor.shape)}")
    if transform.pre_reshape is not None:
        tensor = tensor.reshape(transform.pre_reshape)
    if transform.perm is not None:
        if len(transform.perm) != tensor.dim():
            raise ValueError(f"perm {transform.perm} does not fit rank-{tensor.dim()} shape {list(tensor.shape)}")
        tensor = tensor.permute(transform.perm)
    if transform.reshape is not None:
        tensor = tensor.reshape(transform.reshape)
    return tensor


# -------------------------------------------------------------------------------------------- protocol


def owns(model: Any) -> bool:
    """True for a ``torch.nn.Module``."""
    return isinstance(model, torch.nn.Module)


def _sharded(tensors: Any) -> bool:
    """True if any tensor is a DTensor (checked without importing torch.distributed: a DTensor model imported it)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def collective_load(model: torch.nn.Module) -> bool:
    """True when loading into ``model`` is collective across ``torch.distributed`` ranks.

    So it is for a model with DTensor parameters or buffers (FSDP2 ``fully_shard``, tensor parallel): each rank
    reads its own shard, and the ranks agree before any of them changes its model, so every rank calls the load.
    ``hubload.load`` then runs the whole read-check-apply step under :func:`hubload.distributed.all_or_nothing`.
    Without an initialised process group no rank can take part in a collective, so the answer is False without
    walking the model (a DTensor needs a device mesh, which needs the group).
    """
    if process_group() is None:
        return False
    return _sharded(model.state_dict(keep_vars=True).values())


def spec(model: torch.nn.Module) -> dict[str, ModelTensor]:
    """The model's ``state_dict`` entries as canonical tensor specs (no data copied).

    Args:
        model: A ``torch.nn.Module`` (on any device, ``meta`` included).

    Returns:
        state_dict key -> :class:`~hubload.adapters.ModelTensor` (handle: the Parameter/buffer).
    """
    out: dict[str, ModelTensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):  # skip get_extra_state() payloads
            out[key] = ModelTensor(key, tuple(value.shape), canonical_dtype(value.dtype), key, None, None, value)
    return out


def _target_dtype(policy: Any, model_dtype: torch.dtype, ckpt_dtype: torch.dtype) -> torch.dtype:
    """dtype a checkpoint tensor is cast to under ``dtype_policy``."""
    if policy == "model":
        return model_dtype
    if policy == "checkpoint":
        return ckpt_dtype
    wanted = policy if isinstance(policy, torch.dtype) else _torch_dtype(canonical_dtype(policy))
    # An explicit dtype applies to floating-point tensors; integer buffers keep the model's dtype.
    return wanted if model_dtype.is_floating_point else model_dtype


def apply(model: torch.nn.Module, report: Any, reader: Any, *, dtype_policy: Any = "model",
          device: Any = None, model_spec: Mapping[str, ModelTensor] | None = None) -> None:
    """Copy the report's matched tensors from ``reader`` into ``model``, all or nothing.

    Every matched tensor is read, re-laid-out with the report's checkpoint -> canonical transform,
    shape-checked and cast before ``load_state_dict`` runs, so any problem leaves the model as it was.

    Args:
        model: The target module.
        report: A :class:`~hubload.compat.CompatReport` from ``check(..., spec(model))``; it must allow
            loading (:meth:`~hubload.compat.CompatReport.raise_if_incompatible` is called first).
        reader: The checkpoint reader the report was computed from.
        dtype_policy: "model" (cast to each model tensor's dtype), "checkpoint" (keep the stored
            dtypes; the model's tensors are replaced) or a dtype ("float16", ``torch.bfloat16``) for
            floating-point tensors.
        device: For a model on the ``meta`` device: where the materialised tensors go (default CPU,
            backed by the memory-mapped file). Models with real tensors keep their devices.
        model_spec: :func:`spec` of the model if the caller has it already (saves a state_dict walk).

    Raises:
        IncompatibleWeightsError: The report forbids loading, a tensor does not fit its model
            tensor, or ``load_state_dict`` disagreed with the report (carries the report).
        CheckpointError: A tensor cannot be read.
    """
    report.raise_if_incompatible()
    if model_spec is None:
        model_spec = spec(model)
    model_sd = {k: t.handle for k, t in model_spec.items()}  # spec handles are the state_dict tensors
    if _sharded(model_sd.values()):  # FSDP2 / DTensor: each rank reads only its shard (adapters/torch_dtensor.py)
        from hubload.adapters.torch_dtensor import apply_sharded

        n = apply_sharded(model, report, reader, model_sd, dtype_policy=dtype_policy, device=device,
                          to_torch=to_torch, relayout=relayout, torch_dtype=_torch_dtype, target_dtype=_target_dtype)
        logger.info("loaded %d tensors into the local shards of %s", n, type(model).__name__)
        return
    on_meta = any(v.is_meta for v in model_sd.values())
    assign = on_meta or dtype_policy != "model"
    storages = _FileStorages()

    converted: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for m in report.matched:
        target = model_sd.get(m.key)
        if target is None:
            problems.append(f"{m.key}: the model has no such state_dict entry")
            continue
        try:
            t, readonly = to_torch(reader, m.source, _storages=storages, owned=assign)
            if m.transform is not None:
                t = relayout(t, m.transform)
        except ValueError as exc:
            problems.append(f"{m.key} (checkpoint {m.source!r}): {exc}")
            continue
        if t.shape != target.shape:  # torch.Size on both sides
            problems.append(f"{m.key}: checkpoint tensor {m.source!r} has shape {list(t.shape)}, "
                            f"the model expects {list(target.shape)}")
            continue
        dtype = target.dtype if dtype_policy == "model" else _target_dtype(dtype_policy, target.dtype, t.dtype)
        if t.dtype != dtype:
            t = t.to(dtype)
        elif assign and readonly:
            t = t.clone()  # the model will own it; read-only mmap pages must not back a parameter
        if assign:
            t = t.contiguous()  # no-op (no copy) for untransformed tensors
            dev = device if on_meta else target.device
            if dev is not None:
                t = t.to(dev)
        converted[m.key] = t
    if problems:
        raise nothing_loaded_error(reader, model, problems, report, "copied")

    result = model.load_state_dict(converted, strict=False, assign=assign)
    expected_missing = set(model_sd) - set(converted)
    if not set(result.missing_keys) <= expected_missing or result.unexpected_keys:  # BN counters self-fill
        raise IncompatibleWeightsError(
            f"load_state_dict into {type(model).__name__} disagreed with the compat report: missing "
            f"{sorted(set(result.missing_keys) ^ expected_missing)}, unexpected {list(result.unexpected_keys)}",
            report=report)
    if on_meta:
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            logger.warning("%s: %d tensors are still on the meta device (not in the checkpoint): %s; "
                           "initialise them before use", type(model).__name__, len(left), ", ".join(left[:5]))
    logger.info("loaded %d tensors into %s", len(converted), type(model).__name__)


def freeze(model: torch.nn.Module, names: list[str]) -> None:
    """Stop gradients for the named parameters (``requires_grad_(False)``).

    Args:
        model: The module.
        names: state_dict keys (as in :func:`spec` and the report); buffers among them are skipped,
            they are never trained.

    Raises:
        HubloadError: A name is neither a parameter nor a buffer of the model.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    unknown = [n for n in names if n not in params and n not in buffers]
    if unknown:
        raise UsageError(f"{type(model).__name__}: cannot freeze {unknown[:5]}: no such parameter")
    for n in names:
        if n in params:
            params[n].requires_grad_(False)


def build(architecture: str, config: dict[str, Any] | None = None) -> torch.nn.Module:
    """Instantiate a PyTorch model from ``"package.module:callable"`` and keyword ``config``.

    Args:
        architecture: Import path of a class or factory, e.g. ``"hubload.zoo.torch_models:mlp"``.
        config: Keyword arguments for it.

    Returns:
        The ``nn.Module``.

    Raises:
        RegistryError: Bad module/callable/config, or the callable did not return an ``nn.Module``.
        MissingDependencyError: The module needs a framework that is not installed.
    """
    model = call_architecture(architecture, config)
    if not isinstance(model, torch.nn.Module):
        raise RegistryError(f"architecture {architecture!r} returned a {type(model).__name__}, not a "
                            "torch.nn.Module; point it at a PyTorch model class or factory", field="architecture")
    return model


# ------------------------------------------------------------------- rest of the adapter Protocol
# Declared so api.py never branches on the adapter's name (see hubload.adapters.Adapter).

native_layout = "torch"
native_formats: tuple[str, ...] = ()
apply_options = frozenset({"dtype_policy", "device", "model_spec"})
dtype_policies: tuple[str, ...] | None = None  # "model", "checkpoint" or any dtype name


def place(model: torch.nn.Module, device: Any) -> torch.nn.Module:
    """``model.to(device)`` (unchanged when ``device`` is None)."""
    return model if device is None else model.to(device)


def build_scope(strategy: Any) -> Any:
    """PyTorch has no tf.distribute strategies."""
    from hubload.errors import UsageError

    raise UsageError("strategy= is a tf.distribute strategy; use it with framework='tf' (for torch, wrap the "
                     "loaded model in DDP/FSDP yourself)")


def restore_native(model: Any, path: Any, optimizer: Any = None) -> Any:
    """PyTorch checkpoints load through the compat check; optimizer state is not restored by hubload."""
    from hubload.errors import UsageError

    raise UsageError("optimizer= restores optimizer state from a tf.train.Checkpoint into a Keras model; for "
                     "torch, load the optimizer's state_dict yourself")


def load_full(path: Any) -> Any:
    """PyTorch has no whole-model artifact hubload loads (pickled modules need code execution)."""
    from hubload.errors import UsageError

    raise UsageError(f"{path}: whole saved models load into Keras/TF only; build the torch model and pass model=")


from hubload.adapters.torch_behaviour import (  # noqa: E402  (behaviour checks, see that module)
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
            "infer_inputs", "load_full", "native_formats", "native_layout", "place", "read_tensor", "restore",
            "restore_native", "run", "snapshot", "to_canonical_inputs", "to_native_inputs"]
