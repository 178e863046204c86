"""Lazy, framework-free checkpoint readers: names, shapes and dtypes first, tensor bytes on demand.

Every reader follows :class:`CheckpointReader`: ``tensors()`` answers from headers and indexes without
reading tensor data, ``get(name)`` returns one tensor. ``open_checkpoint`` picks a reader from the
suffix, the folder contents or the first bytes of the file.

Formats read here without any framework: safetensors (single file or sharded), ``.npz`` and Keras 3
``.weights.h5`` (h5py). PyTorch pickles and TF checkpoints are read by ``hubload.adapters.torch`` and
``hubload.adapters.tf``, imported only when such a file is opened.

numpy, ml_dtypes and h5py are imported inside functions: ``import hubload`` stays light.

This module holds format detection and :func:`open_checkpoint`, plus :class:`ShardedReader`, which joins the
shards of any format. The reader contract and dtype helpers live in ``hubload.checkpoint``, the formats in
``hubload.safetensors_io``, ``hubload.npz_io`` and ``hubload.keras_h5``; their public names are re-exported
here.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import struct
import zipfile
from collections.abc import Callable
from typing import Any

from hubload.checkpoint import (  # re-exported
    SAFETENSORS_DTYPES,
    CheckpointReader,
    ReaderBase,
    TensorInfo,
    canonical_dtype,
    numpy_dtype,
)
from hubload.errors import CheckpointError, MissingDependencyError
from hubload.keras_h5 import KERAS_VAR_ORDER, KerasWeightsReader  # re-exported
from hubload.npz_io import NpzReader  # re-exported
from hubload.safetensors_io import (  # re-exported
    MAX_SAFETENSORS_HEADER,
    SafetensorsHeader,
    SafetensorsReader,
    layout_from_metadata,
    parse_safetensors_header,
    read_safetensors_header,
    safetensors_header_length,
)

__all__ = [
    "FORMATS",
    "KERAS_VAR_ORDER",
    "MAX_SAFETENSORS_HEADER",
    "SAFETENSORS_DTYPES",
    "CheckpointReader",
    "KerasWeightsReader",
    "NpzReader",
    "SafetensorsHeader",
    "SafetensorsReader",
    "ShardedReader",
    "TensorInfo",
    "canonical_dtype",
    "numpy_dtype",
    "open_checkpoint",
    "parse_safetensors_header",
    "read_safetensors_header",
    "safetensors_header_length",
]

logger = logging.getLogger("hubload")

FORMATS = ("safetensors", "torch", "tf-checkpoint", "keras-weights", "npz")

_SUPPORTED = ("safetensors (.safetensors, *.safetensors.index.json or a folder of shards), "
              ".npz, Keras .weights.h5, PyTorch .pt/.pth/.bin/.ckpt, TF checkpoint prefixes")


# -------------------------------------------------------------------------------------------- shards


class ShardedReader(ReaderBase):
    """Several shard readers seen as one checkpoint (``*.index.json`` with a ``weight_map``, or a folder).

    Attributes:
        path: The index file or folder.
        format: The shards' format.
        layout: The layout the index's metadata declares, else the shards' layout.
        metadata: The index's ``metadata`` object ({} without an index).
        shards: Shard file name -> reader.
    """

    def __init__(self, path: str | os.PathLike[str], shards: dict[str, Any],
                 weight_map: dict[str, str] | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.path = pathlib.Path(path)
        self.shards = shards
        self.metadata = dict(metadata or {})
        first = next(iter(shards.values()), None)
        self.format = getattr(first, "format", "safetensors")
        self.layout = layout_from_metadata(self.metadata, getattr(first, "layout", "torch"))
        self._where: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        for shard_name, reader in shards.items():
            for name, info in reader.tensors().items():
                if name in self._where:
                    self.close()
                    raise CheckpointError(f"{self.path}: tensor {name!r} appears in two shards "
                                          f"({self._where[name]} and {shard_name}); the checkpoint is inconsistent")
                self._where[name] = shard_name
                self._infos[name] = info
        for name, shard_name in (weight_map or {}).items():
            if self._where.get(name) != shard_name:
                self.close()
                raise CheckpointError(f"{self.path}: the index puts {name!r} in {shard_name}, but that shard "
                                      "does not hold it; the index and shards do not belong together")
        if weight_map is not None:
            extra = sorted(set(self._where) - set(weight_map))
            if extra:
                logger.warning("%s: %d tensors in the shards are not listed in the index (e.g. %s)",
                               self.path, len(extra), extra[0])

    def get(self, name: str) -> Any:
        """Return one tensor from the shard that holds it.

        Raises:
            CheckpointError: No such tensor.
        """
        shard = self._where.get(name)
        if shard is None:
            raise self._unknown(name)
        return self.shards[shard].get(name)

    def shard_of(self, name: str) -> str:
        """The shard file name holding ``name``."""
        if name not in self._where:
            raise self._unknown(name)
        return self._where[name]

    def close(self) -> None:
        """Close every shard."""
        for reader in self.shards.values():
            reader.close()


def _open_shards(paths: dict[str, pathlib.Path], opener: Callable[[pathlib.Path], Any]) -> dict[str, Any]:
    """Open every shard (shard name -> path) with ``opener``; on any failure close those already open."""
    shards: dict[str, Any] = {}
    try:
        for shard_name, shard_path in paths.items():
            shards[shard_name] = opener(shard_path)
    except BaseException:
        for r in shards.values():
            r.close()
        raise
    return shards


def _open_index(path: pathlib.Path, *, key: str | None = None) -> ShardedReader:
    """Open a ``*.index.json`` (safetensors or torch shards)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read shard index: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: a shard index needs a 'weight_map' object mapping tensor names to files")
    shard_names = list(dict.fromkeys(weight_map.values()))
    for s in shard_names:  # an index must not reach outside its folder
        if pathlib.PurePath(s).is_absolute() or ".." in pathlib.PurePath(s).parts:
            raise CheckpointError(f"{path}: shard name {s!r} points outside the index's folder")
    missing = [s for s in shard_names if not (path.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{path}: shard(s) listed in the index are missing: {', '.join(missing)}; "
                              "download every file the index names")
    shards = _open_shards({s: path.parent / s for s in shard_names}, lambda p: open_checkpoint(p, key=key))
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return ShardedReader(path, shards, weight_map, meta)


# ---------------------------------------------------------------------------------------------- detect

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _torch_reader(path: pathlib.Path, key: str | None) -> Any:
    """Open a PyTorch pickle via the torch adapter (imported only now)."""
    try:
        from hubload.adapters.torch import TorchPickleReader
    except ImportError as exc:
        if (getattr(exc, "name", None) or "").split(".")[0] == "torch":
            raise MissingDependencyError("reading a PyTorch pickle", "torch", detail=str(path)) from exc
        raise
    return TorchPickleReader(path, key=key)


def _tf_reader(prefix: pathlib.Path, key: str | None = None) -> Any:
    """Open a TF checkpoint via the TF adapter (imported only now)."""
    try:
        from hubload.adapters.tf import TFCheckpointReader
    except ImportError as exc:
        if (getattr(exc, "name", None) or "").split(".")[0] in ("tensorflow", "keras", "h5py"):
            raise MissingDependencyError("reading a TF checkpoint", "tf", detail=str(prefix)) from exc
        raise
    return TFCheckpointReader(prefix, key=key)


def _tf_prefix_in_folder(folder: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint prefix a TF checkpoint folder points at (``checkpoint`` file or a lone ``*.index``)."""
    state = folder / "checkpoint"
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.M)
        if m:
            p = pathlib.Path(m.group(1))
            p = p if p.is_absolute() else folder / p
            if pathlib.Path(f"{p}.index").is_file():
                return p
    indexes = [p for p in folder.glob("*.index") if p.is_file()]
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    return None


def _sniff(path: pathlib.Path) -> str | None:
    """Guess a file's format from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if head.startswith(_HDF5_MAGIC):
        return "keras-weights"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return None
    if head[:1] == b"\x80":  # pickle protocol >= 2 (legacy torch.save)
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= MAX_SAFETENSORS_HEADER and 8 + n <= size:
            return "safetensors"
    return None


def _open_folder(path: pathlib.Path, key: str | None) -> Any:
    """Open a folder: sharded safetensors, a TF checkpoint, or its single checkpoint file."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json", "*.index.json"):
        found = sorted(path.glob(pattern))
        if len(found) == 1:
            return _open_index(found[0], key=key)
        if len(found) > 1:
            raise CheckpointError(f"{path}: several shard indexes ({', '.join(p.name for p in found)}); "
                                  "open the one you want directly")
    st = sorted(path.glob("*.safetensors"))
    if len(st) == 1:
        return SafetensorsReader(st[0])
    if len(st) > 1:
        return ShardedReader(path, _open_shards({p.name: p for p in st}, SafetensorsReader))
    prefix = _tf_prefix_in_folder(path)
    if prefix is not None:
        return _tf_reader(prefix, key)
    candidates = [p for p in sorted(path.iterdir()) if p.is_file() and
                  (p.suffix in (".npz", ".h5", *_TORCH_SUFFIXES))]
    if len(candidates) == 1:
        return open_checkpoint(candidates[0], key=key)
    raise CheckpointError(f"{path}: cannot tell which checkpoint this folder holds "
                          f"({len(candidates)} candidate files); pass the file itself. Supported: {_SUPPORTED}")


def open_checkpoint(path: str | os.PathLike[str], *, format: str | None = None, key: str | None = None) -> Any:
    """Open a checkpoint lazily, detecting its format from the suffix, folder contents or first bytes.

    Args:
        path: A file, a folder of shards / a TF checkpoint folder, a ``*.index.json`` or a TF prefix.
        format: Force one of :data:`FORMATS` instead of detecting.
        key: For PyTorch pickles holding a dict of things, the entry with the state dict
            (e.g. "state_dict", "model").

    Returns:
        A :class:`CheckpointReader` (use it as a context manager).

    Raises:
        CheckpointError: The path does not exist, or holds nothing hubload can read.
        MissingDependencyError: The format needs torch / tensorflow / h5py and it is not installed.
    """
    p = pathlib.Path(path)
    if format is not None and format not in FORMATS:
        raise CheckpointError(f"{p}: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    name = p.name

    if format == "tf-checkpoint" or (format is None and not p.exists() and pathlib.Path(f"{p}.index").is_file()):
        if p.is_dir():
            prefix = _tf_prefix_in_folder(p)
            if prefix is None:
                raise CheckpointError(f"{p}: no TF checkpoint (no 'checkpoint' file or single *.index) here")
            return _tf_reader(prefix, key)
        return _tf_reader(p, key)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        return _open_folder(p, key)

    if format is None:
        if name.endswith(".index.json"):
            return _open_index(p, key=key)
        if name.endswith(".safetensors"):
            format = "safetensors"
        elif name.endswith(".npz"):
            format = "npz"
        elif name.endswith((".h5", ".hdf5")):
            format = "keras-weights"
        elif name.endswith(".index") and pathlib.Path(str(p)[:-len(".index")] + ".data-00000-of-00001").exists():
            return _tf_reader(pathlib.Path(str(p)[:-len(".index")]), key)
        elif re.search(r"\.data-\d{5}-of-\d{5}$", name):
            return _tf_reader(pathlib.Path(re.sub(r"\.data-\d{5}-of-\d{5}$", "", str(p))), key)
        elif name.endswith(_TORCH_SUFFIXES):
            format = "torch"
        else:
            format = _sniff(p)
        if format is None:
            raise CheckpointError(f"{p}: unrecognised checkpoint format. Supported: {_SUPPORTED}; "
                                  "pass format=... if the file has an unusual name")

    if format == "safetensors":
        return SafetensorsReader(p)
    if format == "npz":
        return NpzReader(p)
    if format == "keras-weights":
        return KerasWeightsReader(p)
    return _torch_reader(p, key)
