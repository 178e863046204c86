"""Loading into DTensor models (FSDP2 ``fully_shard``, tensor parallel): each rank reads only its own slice.

    report (global shapes, checked before any read)
      └─► per tensor: placements + mesh ─► compute_local_shape_and_global_offset ─► local box
            ├─ safetensors (file or sharded index): pread the box into a fresh local buffer (no map, no full tensor)
            └─ torch pickle: slice of the memory-mapped tensor, copied out (only the slice's pages are touched)
      └─► every rank votes (hubload.distributed.agree): one failure anywhere ─► HubloadError on every rank
      └─► commit: meta model ─► load_state_dict(assign=True) with DTensor.from_local (FSDP2 re-pads its shards
                  in its own post-hook); materialised model ─► copy into each local shard in place

The local shape and offset come from torch's own ``compute_local_shape_and_global_offset`` (what
``torch.distributed.checkpoint`` uses), so FSDP2's uneven last shard, ``Replicate`` and n-D meshes follow
torch's rules rather than a re-derivation of them. Placements whose local data is not one box of the global
tensor (``Partial``, ``_StridedShard``) are refused before anything is read.

Imported by :mod:`hubload.adapters.torch` only when a model holds DTensors (``torch.distributed.tensor`` is
then imported already).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from hubload import distributed
from hubload.adapters import nothing_loaded_error
from hubload.errors import CheckpointError, HubloadError, IncompatibleWeightsError
from hubload.readers import ShardedReader
from hubload.safetensors_io import SafetensorsReader, read_region

__all__ = ["apply_sharded", "local_box"]

logger = logging.getLogger("hubload")


def local_box(target: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local_shape, global_offset)`` of this rank's part of ``target`` (torch's own computation).

    Raises:
        ValueError: A placement whose local data is not one box of the global tensor.
    """
    for p in target.placements:
        if p.is_partial():
            raise ValueError(f"placement {p} holds partial sums, not a slice of the weights; load into a model whose "
                             "parameters are Shard or Replicate")
        if type(p) not in (Shard, Replicate):  # _StridedShard (FSDP over TP) and anything newer
            raise ValueError(f"placement {p!r} interleaves the tensor's rows (not one box per rank); hubload reads "
                             "Shard(dim) and Replicate placements")
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    if len(offset) != len(target.shape):  # this rank is not part of the tensor's mesh: nothing to read
        return tuple(0 for _ in target.shape), tuple(0 for _ in target.shape)
    return tuple(int(s) for s in shape), tuple(int(o) for o in offset)


def _file_of(reader: Any, name: str) -> Any:
    """The one-file reader holding ``name`` behind ``reader`` (itself, or the shard of a sharded index)."""
    if isinstance(reader, ShardedReader):
        return _file_of(reader.shards[reader.shard_of(name)], name)
    return reader


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _source_box(transform: Any, offset: tuple[int, ...], shape: tuple[int, ...]
                ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None] | None:
    """The checkpoint-side box for a canonical box: (offset, shape, perm to apply after), or None if a reshape."""
    if transform is None or transform.is_identity:
        return offset, shape, None
    if transform.reshape is not None or transform.pre_reshape is not None:
        return None
    perm = transform.perm
    src_off, src_shape = [0] * len(perm), [0] * len(perm)
    for i, p in enumerate(perm):  # canonical dim i is checkpoint dim perm[i]
        src_off[p], src_shape[p] = offset[i], shape[i]
    return tuple(src_off), tuple(src_shape), tuple(perm)


class _Loader:
    """Reads each matched tensor's local part for one rank (the read phase of :func:`apply_sharded`)."""

    def __init__(self, reader: Any, to_torch: Any, relayout: Any, torch_dtype: Any) -> None:
        self.reader = reader
        self.infos = reader.tensors()
        self._to_torch, self._relayout, self._torch_dtype = to_torch, relayout, torch_dtype
        self._warned: set[str] = set()

    def _warn_whole(self, name: str, why: str) -> None:
        """Say once per reason that a tensor is read whole before its shard is kept."""
        if why not in self._warned:
            self._warned.add(why)
            logger.warning("%s: %s, so each rank reads tensor %r (and others like it) whole and keeps only its "
                           "shard; use a safetensors checkpoint to read only the shard", self.reader.path, why, name)

    def whole(self, name: str, transform: Any) -> torch.Tensor:
        """The full canonical tensor (for plain, unsharded model tensors)."""
        t, _ = self._to_torch(self.reader, name, owned=False)
        return self._relayout(t, transform)

    def box(self, name: str, transform: Any, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """A fresh contiguous tensor holding the canonical box ``offset + shape`` of checkpoint tensor ``name``."""
        ckpt_dtype = self._torch_dtype(self.infos[name].dtype)
        src = _source_box(transform, offset, shape)
        if src is None:
            self._warn_whole(name, "the layout transform reshapes this tensor")
            full = self.whole(name, transform)
            return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))].contiguous().clone()
        src_off, src_shape, perm = src
        file = _file_of(self.reader, name)
        buf = torch.empty(src_shape, dtype=ckpt_dtype)
        at = file.data_offset(name) if hasattr(file, "data_offset") else None  # a zip torch pickle's tensor
        if isinstance(file, SafetensorsReader):
            file.read_region(name, src_off, src_shape, _bytes(buf))
        elif at is not None:
            read_region(file.path, at, self.infos[name].shape, buf.element_size(), src_off, src_shape, _bytes(buf),
                        label=f"{file.path}: tensor {name!r}")
        else:
            fmt = getattr(file, "format", "this")
            if fmt != "torch":  # a legacy torch pickle is still memory-mapped: the slice touches only its pages
                self._warn_whole(name, f"{fmt} checkpoints are not read in slices")
            t, _ = self._to_torch(self.reader, name, owned=False)
            buf.copy_(t[tuple(slice(o, o + s) for o, s in zip(src_off, src_shape))])
        return buf if perm is None else buf.permute(perm).contiguous()


def _device_for(target: torch.Tensor, mesh: Any, device: Any) -> torch.device:
    """Where a rank's new local tensor lives: ``device=``, else the target's, else the mesh's device type."""
    if device is not None:
        return torch.device(device)
    if not target.is_meta:
        return target.device
    kind = getattr(mesh, "device_type", "cpu") if mesh is not None else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind, None)
    index = module.current_device() if module is not None and hasattr(module, "current_device") else None
    return torch.device(kind, index)


def apply_sharded(model: torch.nn.Module, report: Any, reader: Any, model_sd: Mapping[str, torch.Tensor], *,
                  dtype_policy: Any, device: Any, to_torch: Any, relayout: Any, torch_dtype: Any,
                  target_dtype: Any) -> int:
    """Load the report's matched tensors into a model with DTensor parameters; all ranks succeed or all raise.

    Called by :func:`hubload.adapters.torch.apply` (which passes its conversion helpers). Collective: every rank of
    the default process group must call it (``hubload.load`` does), since the ranks vote before anything changes.

    Returns:
        The number of tensors loaded.

    Raises:
        IncompatibleWeightsError: A tensor does not fit, or a placement cannot be read as a slice (on the rank
            that found it; the others raise the same error or a HubloadError naming that rank).
        CheckpointError: A read failed on some rank.
    """
    on_meta = any(t.is_meta or (isinstance(t, DTensor) and t.to_local().is_meta) for t in model_sd.values())
    assign = on_meta or dtype_policy != "model"
    error: BaseException | None = None
    loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (target, new local data)
    try:
        loader = _Loader(reader, to_torch, relayout, torch_dtype)
        problems: list[str] = []
        for m in report.matched:
            target = model_sd.get(m.key)
            if target is None:
                problems.append(f"{m.key}: the model has no such state_dict entry")
                continue
            info = loader.infos.get(m.source)
            if info is None:
                problems.append(f"{m.key}: checkpoint tensor {m.source!r} is not in {getattr(reader, 'path', '')}")
                continue
            global_shape = tuple(m.transform.out_shape(info.shape)) if m.transform is not None else tuple(info.shape)
            if global_shape != tuple(target.shape):
                problems.append(f"{m.key}: checkpoint tensor {m.source!r} has shape {list(global_shape)}, the model "
                                f"expects {list(target.shape)}")
                continue
            try:
                if isinstance(target, DTensor):
                    shape, offset = local_box(target)
                    have = tuple(target.to_local().shape)
                    if have != shape:
                        problems.append(f"{m.key}: the local shard has shape {list(have)}, but placements "
                                        f"{list(target.placements)} on a mesh of {tuple(target.device_mesh.shape)} give "
                                        f"{list(shape)}; reshard it with torch's own APIs before loading")
                        continue
                    data = loader.box(m.source, m.transform, offset, shape)
                else:
                    data = loader.whole(m.source, m.transform).contiguous()
            except ValueError as exc:
                if isinstance(exc, HubloadError):
                    raise
                problems.append(f"{m.key} (checkpoint {m.source!r}): {exc}")
                continue
            dtype = target_dtype(dtype_policy, target.dtype, data.dtype)
            data = data.to(dtype) if data.dtype != dtype else data
            if assign and not isinstance(target, DTensor):  # the model will own it: not the checkpoint's map
                data = data.clone()
            mesh = target.device_mesh if isinstance(target, DTensor) else None
            loaded[m.key] = (target, data.to(_device_for(target.to_local() if mesh else target, mesh, device)))
        if problems:
            raise nothing_loaded_error(reader, model, problems, report, "copied on any rank")
    except HubloadError as exc:
        error = exc
    except Exception as exc:  # a raw torch / OS error while reading: name the file, keep the cause
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        error = CheckpointError(f"{getattr(reader, 'path', 'checkpoint')}: rank {rank} could not read its shards "
                                f"({type(exc).__name__}: {exc}); nothing was copied on any rank")
        error.__cause__ = exc
    distributed.agree(error, label=str(getattr(reader, "path", "")))  # raises on every rank if any rank failed

    if assign:
        state = {k: (DTensor.from_local(d, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                        stride=t.stride()) if isinstance(t, DTensor) else d)
                 for k, (t, d) in loaded.items()}
        result = model.load_state_dict(state, strict=False, assign=True)
        expected_missing = set(model_sd) - set(state)
        if not set(result.missing_keys) <= expected_missing or result.unexpected_keys:
            raise IncompatibleWeightsError(
                f"load_state_dict into {type(model).__name__} disagreed with the compat report: missing "
                f"{sorted(set(result.missing_keys) ^ expected_missing)}, unexpected {list(result.unexpected_keys)}",
                report=report)
    else:
        with torch.no_grad():
            for target, data in loaded.values():
                (target.to_local() if isinstance(target, DTensor) else target).copy_(data)
    if on_meta:
        left = [n for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor) and
                (t.to_local() if isinstance(t, DTensor) else t).is_meta]
        if left:
            logger.warning("%s: %d tensors are still on the meta device (not in the checkpoint): %s; initialise them "
                           "before use", type(model).__name__, len(left), ", ".join(left[:5]))
    return len(loaded)

