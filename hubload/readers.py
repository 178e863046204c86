"""Lazy, framework-free checkpoint readers: names, shapes and dtypes first, tensor bytes on demand.

Every reader follows :class:`CheckpointReader`: ``tensors()`` answers from headers and indexes without
reading tensor data, ``get(name)`` returns one tensor. ``open_checkpoint`` picks a reader from the
suffix, the folder contents or the first bytes of the file.

Formats read here without any framework: safetensors (single file or sharded), ``.npz`` and Keras 3
``.weights.h5`` (h5py). PyTorch pickles and TF checkpoints are read by ``hubload.adapters.torch`` and
``hubload.adapters.tf``, imported only when such a file is opened.

numpy, ml_dtypes and h5py are imported inside functions: ``import hubload`` stays light.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Protocol, runtime_checkable

from hubload.errors import CheckpointError, MissingDependencyError, UnsafeCheckpointError

__all__ = [
    "FORMATS",
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

# Same cap as the safetensors library: a longer header is corrupt or hostile, never a real model.
MAX_SAFETENSORS_HEADER = 100_000_000

# safetensors dtype tag -> (canonical dtype name, itemsize in bytes). Canonical names are numpy /
# ml_dtypes / torch names, so ``numpy_dtype(name)`` and ``getattr(torch, name)`` both resolve them.
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}

_ML_DTYPES = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                        "float8_e8m0fnu"})

_SUPPORTED = ("safetensors (.safetensors, *.safetensors.index.json or a folder of shards), "
              ".npz, Keras .weights.h5, PyTorch .pt/.pth/.bin/.ckpt, TF checkpoint prefixes")


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor, read without touching its bytes.

    Attributes:
        name: Key as stored in the checkpoint (native naming of its layout).
        shape: Tensor shape.
        dtype: Canonical dtype name ("float32", "bfloat16", "int64", "bool", "float8_e4m3fn" ...).
        nbytes: Size of the tensor data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@runtime_checkable
class CheckpointReader(Protocol):
    """A lazily opened checkpoint. Readers are context managers."""

    path: pathlib.Path
    format: str
    layout: str

    def tensors(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes only; no tensor bytes are read."""

    def get(self, name: str) -> Any:
        """One tensor's data (numpy array for the framework-free readers)."""

    def close(self) -> None:
        """Release files and memory maps."""

    def __enter__(self) -> CheckpointReader: ...

    def __exit__(self, *exc: object) -> None: ...


# --------------------------------------------------------------------------------------------- dtypes


def numpy_dtype(name: str) -> Any:
    """Return the numpy dtype (little-endian) for a canonical dtype name.

    Args:
        name: Canonical name such as "float32" or "bfloat16".

    Returns:
        A ``numpy.dtype``; bfloat16 and float8 types come from ml_dtypes.

    Raises:
        CheckpointError: ``name`` is not a dtype numpy/ml_dtypes know.
    """
    import numpy as np

    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    try:
        return np.dtype(name).newbyteorder("<")
    except TypeError as exc:
        raise CheckpointError(f"unknown dtype {name!r}; hubload knows {sorted(v for v, _ in SAFETENSORS_DTYPES.values())}") from exc


def canonical_dtype(dtype: Any) -> str:
    """Canonical dtype name of a numpy, torch or TensorFlow dtype (or a string naming one).

    Args:
        dtype: ``numpy.dtype``, ``torch.dtype``, ``tf.DType``, a safetensors tag ("F32") or a name.

    Returns:
        "float32", "bfloat16", "int64" ... (torch's ``torch.`` prefix dropped).
    """
    if isinstance(dtype, str):
        if dtype in SAFETENSORS_DTYPES:
            return SAFETENSORS_DTYPES[dtype][0]
        name = dtype
    elif hasattr(dtype, "is_floating_point") and str(dtype).startswith("torch."):
        name = str(dtype)
    else:
        name = getattr(dtype, "name", None) or str(dtype)
    name = name.removeprefix("torch.")
    # torch aliases and numpy's platform names
    return {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32",
            "bool_": "bool", "short": "int16"}.get(name, name)


# ---------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated safetensors header.

    Attributes:
        tensors: Name -> TensorInfo, in file order.
        metadata: The ``__metadata__`` string map ({} when absent).
        offsets: Name -> (begin, end) byte offsets relative to the data section.
        data_start: File offset of the data section (8 + header length).
        data_size: Bytes the data section must hold (end of the last tensor).
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    offsets: dict[str, tuple[int, int]]
    data_start: int
    data_size: int


def safetensors_header_length(prefix: bytes, *, file_size: int | None = None, source: str = "") -> int:
    """Decode and sanity-check the 8-byte little-endian header length that starts a safetensors file.

    A remote reader fetches these 8 bytes first (HTTP Range ``bytes=0-7``), then the header itself.

    Args:
        prefix: At least the first 8 bytes of the file.
        file_size: Total file size, if known; the header must fit in it.
        source: File or URL, for error messages.

    Returns:
        The header length N; the JSON header occupies bytes [8, 8 + N).

    Raises:
        CheckpointError: Too short, or a length that is absurd or exceeds the file.
    """
    where = source or "safetensors data"
    if len(prefix) < 8:
        raise CheckpointError(f"{where}: file is {len(prefix)} bytes, too short to be safetensors "
                              "(needs an 8-byte header length); the download is probably truncated")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"{where}: safetensors header claims {n} bytes (limit {MAX_SAFETENSORS_HEADER}); "
                              "the file is corrupt or not safetensors")
    if n < 2:
        raise CheckpointError(f"{where}: safetensors header length {n} is too small to hold a JSON object")
    if file_size is not None and 8 + n > file_size:
        raise CheckpointError(f"{where}: safetensors header claims {n} bytes but the file has only "
                              f"{file_size} bytes; the file is truncated or corrupt — delete it and download again")
    return n


def parse_safetensors_header(prefix: bytes, header: bytes, *, file_size: int | None = None,
                             source: str = "") -> SafetensorsHeader:
    """Parse and strictly validate a safetensors header.

    Checks: the length prefix, JSON object syntax, known dtypes, non-negative integer shapes,
    ``shape x itemsize == end - begin``, offsets sorted contiguously from 0 without gaps or overlaps,
    and (when ``file_size`` is given) that the data section is exactly as long as the tensors need.

    Args:
        prefix: The first 8 bytes of the file (the header length).
        header: The N header bytes that follow them.
        file_size: Total file size, when known (omit for a header fetched alone over HTTP).
        source: File or URL, for error messages.

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        CheckpointError: Any of the checks fails.
    """
    where = source or "safetensors data"
    n = safetensors_header_length(prefix, file_size=file_size, source=source)
    if len(header) < n:
        raise CheckpointError(f"{where}: safetensors header is truncated ({len(header)} of {n} bytes)")
    try:
        raw = json.loads(bytes(header[:n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: safetensors header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: safetensors header must be a JSON object")

    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"{where}: safetensors __metadata__ must map strings to strings")

    entries: list[tuple[int, int, str]] = []
    infos: dict[str, TensorInfo] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
            raise CheckpointError(f"{where}: tensor {name!r} needs dtype, shape and data_offsets in the header")
        tag = spec["dtype"]
        if tag not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {tag!r}, which hubload cannot read "
                                  f"(known: {', '.join(SAFETENSORS_DTYPES)})")
        dtype, itemsize = SAFETENSORS_DTYPES[tag]
        shape = spec["shape"]
        offsets = spec["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        count = 1
        for d in shape:
            count *= d
        begin, end = offsets
        if count * itemsize != end - begin:
            raise CheckpointError(f"{where}: tensor {name!r} is {tag}{shape} = {count * itemsize} bytes but its "
                                  f"data_offsets span {end - begin} bytes; the header is corrupt")
        infos[name] = TensorInfo(name, tuple(shape), dtype, end - begin)
        entries.append((begin, end, name))

    # Tensors must tile the data section exactly: no overlap (aliasing) and no gaps (hidden bytes).
    entries.sort()
    pos = 0
    for begin, end, name in entries:
        if begin < pos:
            raise CheckpointError(f"{where}: tensor {name!r} at bytes [{begin}, {end}) overlaps the previous tensor")
        if begin > pos:
            raise CheckpointError(f"{where}: gap before tensor {name!r} (bytes [{pos}, {begin}) belong to no tensor)")
        pos = end
    data_start = 8 + n
    if file_size is not None:
        have = file_size - data_start
        if have < pos:
            raise CheckpointError(f"{where}: file is truncated: tensors need {pos} data bytes, the file has {have}; "
                                  "delete it and download again")
        if have > pos:
            raise CheckpointError(f"{where}: {have - pos} trailing bytes after the last tensor; the file is corrupt")
    return SafetensorsHeader(infos, dict(metadata), {name: (b, e) for b, e, name in entries}, data_start, pos)


def read_safetensors_header(source: bytes | bytearray | memoryview | BinaryIO, *,
                            file_size: int | None = None, name: str = "") -> SafetensorsHeader:
    """Read and validate a safetensors header from bytes or a binary file object.

    Only the 8-byte prefix and the header are read from a file object, never tensor data.

    Args:
        source: The file's leading bytes (at least prefix + header), or a seekable binary file object
            positioned at the start of the file.
        file_size: Total file size. For a file object it is taken from ``seek(0, 2)`` when omitted; for
            bytes it is not assumed (the bytes may be only the header).
        name: File or URL, for error messages.

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        CheckpointError: The header is malformed, hostile or inconsistent with the file size.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[:8])
        n = safetensors_header_length(data, file_size=file_size, source=name)
        return parse_safetensors_header(data, bytes(source[8:8 + n]), file_size=file_size, source=name)
    start = source.tell()
    if file_size is None and source.seekable():
        file_size = source.seek(0, os.SEEK_END) - start
        source.seek(start)
    prefix = source.read(8)
    n = safetensors_header_length(prefix, file_size=file_size, source=name)
    return parse_safetensors_header(prefix, source.read(n), file_size=file_size, source=name)


class _ReaderBase:
    """Context-manager plumbing shared by the readers."""

    path: pathlib.Path
    format: str
    layout: str = "torch"

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors()

    def __iter__(self):
        return iter(self.tensors())

    def __len__(self) -> int:
        return len(self.tensors())

    def tensors(self) -> dict[str, TensorInfo]:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def _unknown(self, name: str) -> CheckpointError:
        """Error for a tensor name the checkpoint does not hold."""
        return CheckpointError(f"{self.path}: no tensor named {name!r} in this {self.format} checkpoint "
                               f"({len(self.tensors())} tensors)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r} format={self.format} layout={self.layout}>"


class SafetensorsReader(_ReaderBase):
    """One ``.safetensors`` file, header parsed eagerly and validated, tensors memory-mapped on demand.

    ``get(name)`` returns a read-only numpy array backed by a memory map of the file (zero copy).
    Arrays stay valid after ``close()``: the map is released once the last array is gone.

    Attributes:
        path: The file.
        format: "safetensors".
        layout: "torch" (the usual convention; the caller may override).
        metadata: The header's ``__metadata__`` string map.
        header: The full :class:`SafetensorsHeader`.
    """

    format = "safetensors"

    def __init__(self, path: str | os.PathLike[str], *, layout: str = "torch") -> None:
        self.path = pathlib.Path(path)
        self.layout = layout
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.header = read_safetensors_header(f, file_size=size, name=str(self.path))
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read safetensors file: {exc}") from exc
        self.metadata = self.header.metadata
        declared = (self.metadata or {}).get("hubload_layout")
        if declared in ("torch", "keras"):  # written by `hubload convert`: the file says its convention
            self.layout = declared
        self._map: Any = None

    def tensors(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes from the header."""
        return dict(self.header.tensors)

    def get(self, name: str) -> Any:
        """Return one tensor as a read-only, memory-mapped numpy array.

        Args:
            name: Tensor name as stored in the file.

        Returns:
            ``numpy.ndarray`` of the tensor's dtype and shape, backed by the file.

        Raises:
            CheckpointError: No such tensor.
        """
        import numpy as np

        info = self.header.tensors.get(name)
        if info is None:
            raise self._unknown(name)
        dtype = numpy_dtype(info.dtype)
        begin, end = self.header.offsets[name]
        if end == begin:  # np.memmap cannot map zero bytes
            return np.zeros(info.shape, dtype=dtype)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=0,
                                  shape=(self.header.data_start + self.header.data_size,))
        start = self.header.data_start + begin
        arr = self._map[start:start + (end - begin)].view(dtype).reshape(info.shape)
        return arr.view(np.ndarray)  # plain ndarray view; still backed by (and keeping alive) the map

    def close(self) -> None:
        """Drop the memory map (arrays already handed out keep it alive until they go)."""
        self._map = None


class ShardedReader(_ReaderBase):
    """Several shard readers seen as one checkpoint (``*.index.json`` with a ``weight_map``, or a folder).

    Attributes:
        path: The index file or folder.
        format: The shards' format.
        layout: The shards' layout.
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
        self.layout = getattr(first, "layout", "torch")
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

    def tensors(self) -> dict[str, TensorInfo]:
        """All shards' tensors."""
        return dict(self._infos)

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
    shards: dict[str, Any] = {}
    try:
        for s in shard_names:
            shards[s] = open_checkpoint(path.parent / s, key=key)
    except BaseException:
        for r in shards.values():
            r.close()
        raise
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return ShardedReader(path, shards, weight_map, meta)


# ------------------------------------------------------------------------------------------------ npz


class NpzReader(_ReaderBase):
    """A numpy ``.npz`` archive, read with ``allow_pickle=False``.

    Names, shapes and dtypes come from each member's ``.npy`` header; data is read per tensor.

    Raises:
        UnsafeCheckpointError: A member holds Python objects (loading it would need pickle).
    """

    format = "npz"

    def __init__(self, path: str | os.PathLike[str], *, layout: str = "torch") -> None:
        import numpy as np
        from numpy.lib import format as npformat

        self.path = pathlib.Path(path)
        self.layout = layout
        self._infos: dict[str, TensorInfo] = {}
        self._npz: Any = None
        try:
            with zipfile.ZipFile(self.path) as zf:
                for member in zf.infolist():
                    if not member.filename.endswith(".npy"):
                        continue
                    name = member.filename[:-4]
                    with zf.open(member) as fh:
                        version = npformat.read_magic(fh)
                        reader = {(1, 0): npformat.read_array_header_1_0,
                                  (2, 0): npformat.read_array_header_2_0}.get(version)
                        if reader is None:
                            raise CheckpointError(f"{self.path}: member {member.filename} uses .npy format "
                                                  f"{version}, which hubload does not read")
                        shape, _fortran, dtype = reader(fh, max_header_size=10_000)
                    if dtype.hasobject:
                        raise UnsafeCheckpointError(
                            f"{self.path}: array {name!r} holds Python objects; loading it needs pickle, which "
                            "hubload refuses. Re-save the arrays with numeric dtypes.")
                    dt = canonical_dtype(dtype)
                    self._infos[name] = TensorInfo(name, tuple(int(d) for d in shape), dt,
                                                   int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{self.path}: not a readable .npz archive: {exc}") from exc

    def tensors(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes from the ``.npy`` member headers."""
        return dict(self._infos)

    def get(self, name: str) -> Any:
        """Read one array (``allow_pickle=False``).

        Raises:
            CheckpointError: No such array, or its data is corrupt/truncated.
        """
        import numpy as np

        if name not in self._infos:
            raise self._unknown(name)
        if self._npz is None:
            self._npz = np.load(self.path, allow_pickle=False)
        try:
            return self._npz[name]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise CheckpointError(f"{self.path}: cannot read array {name!r}: {exc}") from exc

    def close(self) -> None:
        """Close the archive."""
        if self._npz is not None:
            self._npz.close()
            self._npz = None


# ------------------------------------------------------------------------------------ Keras .weights.h5

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


class KerasWeightsReader(_ReaderBase):
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

    def tensors(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes from the HDF5 metadata."""
        return dict(self._infos)

    def get(self, name: str) -> Any:
        """Read one variable as a numpy array.

        Raises:
            CheckpointError: No such variable, or the file is closed.
        """
        if name not in self._infos:
            raise self._unknown(name)
        if not self._file:
            raise CheckpointError(f"{self.path}: reader is closed")
        return self._file[self.sources[name]][()]

    def close(self) -> None:
        """Close the HDF5 file."""
        if self._file:
            self._file.close()


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
        shards: dict[str, Any] = {}
        for p in st:
            try:
                shards[p.name] = SafetensorsReader(p)
            except BaseException:
                for r in shards.values():
                    r.close()
                raise
        return ShardedReader(path, shards)
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
