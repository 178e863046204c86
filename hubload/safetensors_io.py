"""safetensors without the safetensors package: strict header parsing and a memory-mapped reader.

The header parser is separate from the reader because remote code paths (``hubload.resolve``) validate a
header fetched over HTTP with a Range request, without the file. Every check a hostile or truncated file
could fail is made before any tensor byte is touched.

numpy is imported inside functions: ``import hubload`` stays light.
"""

from __future__ import annotations

import _thread
import json
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from hubload.checkpoint import SAFETENSORS_DTYPES, ReaderBase, TensorInfo, numpy_dtype
from hubload.errors import CheckpointError

__all__ = [
    "LAYOUT_METADATA_KEY",
    "MAX_SAFETENSORS_HEADER",
    "SafetensorsHeader",
    "SafetensorsReader",
    "FLATTEN_ORDER_METADATA_KEY",
    "layout_from_metadata",
    "parse_safetensors_header",
    "read_region",
    "read_safetensors_header",
    "region_runs",
    "safetensors_header_length",
]

# Same cap as the safetensors library: a longer header is corrupt or hostile, never a real model.
MAX_SAFETENSORS_HEADER = 100_000_000

# Written into the __metadata__ of files `hubload convert` produces, so the layout travels with the file.
LAYOUT_METADATA_KEY = "hubload_layout"
# The feature-map order (channels_first/channels_last) the tensors were flattened in before a Dense/Linear: a
# Keras model converted to the torch layout keeps Keras' channels-last flatten order, which the layout alone
# would not say (the flatten fix would then permute columns that are already right).
FLATTEN_ORDER_METADATA_KEY = "hubload_flatten_order"


def layout_from_metadata(metadata: Any, default: str) -> str:
    """The layout (``torch``/``keras``) a safetensors ``__metadata__`` or shard index ``metadata`` declares, else
    ``default``."""
    declared = metadata.get(LAYOUT_METADATA_KEY) if isinstance(metadata, dict) else None
    return declared if declared in ("torch", "keras") else default


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
        # One pass per field, no generator: this loop runs once per tensor of every file opened.
        count = 1
        if not isinstance(shape, list):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        for d in shape:
            if type(d) is not int or d < 0:  # bool is not int here
                raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
            count *= d
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or begin < 0 or begin > end:
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
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


class SafetensorsReader(ReaderBase):
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
        self.layout = layout_from_metadata(self.metadata, layout)  # a `hubload convert` output says its convention
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
        start = self.header.data_start + begin
        arr = self.buffer()[start:start + (end - begin)].view(dtype).reshape(info.shape)
        return arr.view(np.ndarray)  # plain ndarray view; still backed by (and keeping alive) the map

    def buffer(self) -> Any:
        """The whole file (header included, up to the end of the data) as one read-only uint8 numpy array.

        Tensor ``name`` is at ``header.data_start + header.offsets[name][0]``. Adapters slice this once-per-file
        view themselves instead of wrapping one array per tensor.
        """
        if self._map is None:
            self._map = _map_readonly(self.path, self.header.data_start + self.header.data_size)
        return self._map

    def read_region(self, name: str, offset: tuple[int, ...] | list[int], shape: tuple[int, ...] | list[int],
                    out: Any) -> None:
        """Read a box of tensor ``name`` straight from the file into ``out``, without mapping the file.

        A rank of a sharded model reads its local shard this way: ``pread`` into a buffer it already owns, so
        no page of the file is mapped into the process and nothing outside the box is read.

        Args:
            name: Tensor name as stored in the file.
            offset: Start index of the box in each dimension.
            shape: Extent of the box in each dimension.
            out: A writable, C-contiguous buffer of exactly ``prod(shape) * itemsize`` bytes (the box in row-major
                order), e.g. ``memoryview`` of a preallocated array.

        Raises:
            CheckpointError: No such tensor, a box outside the tensor, a wrong buffer size, or the file is
                shorter than its header says.
        """
        info = self.header.tensors.get(name)
        if info is None:
            raise self._unknown(name)
        itemsize = _ITEMSIZE[info.dtype]
        begin, _ = self.header.offsets[name]
        read_region(self.path, self.header.data_start + begin, info.shape, itemsize, offset, shape, out,
                    label=f"{self.path}: tensor {name!r}")

    def close(self) -> None:
        """Drop the memory map (arrays already handed out keep it alive until they go).

        When this was the last reference, the ``munmap`` runs on a background thread: unmapping 90 MB of
        faulted-in pages takes about 8 ms, which the caller need not wait for (bench row 5).
        """
        if self._map is not None:
            box, self._map = [self._map], None  # no local reference: the background thread holds the last one
            _release_in_background(box)


def _release_in_background(box: list[Any]) -> None:
    """Empty ``box`` on a new thread, so dropping what may be the last reference (an ``munmap``) happens there.

    mmap's dealloc unmaps without the GIL. ``_thread.start_new_thread`` returns at once; ``threading.Thread.start``
    waits until the new thread runs, which cost up to 4 ms on a busy 2-core machine.
    """
    try:
        _thread.start_new_thread(box.clear, ())
    except RuntimeError:  # no new threads (interpreter shutdown, a thread limit): unmap here instead
        box.clear()


def _map_readonly(path: pathlib.Path, length: int) -> Any:
    """A read-only, private memory map of the file's first ``length`` bytes as a uint8 array.

    Pages are faulted in as tensors are read. ``MAP_POPULATE`` was tried and measured slower here: for the 90 MB
    MiniLM file, mapping + ``load_state_dict`` took 20 ms without it and 22-35 ms with it (the bulk fault-in
    runs before, not alongside, the copy; bench row 5).
    """
    import mmap

    import numpy as np

    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no POSIX flags
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(length,))
    flags = mmap.MAP_PRIVATE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), length, flags=flags, prot=mmap.PROT_READ)
    return np.frombuffer(mm, dtype=np.uint8)  # the array keeps the map alive after close()


_ITEMSIZE = {dtype: size for dtype, size in SAFETENSORS_DTYPES.values()}


def region_runs(global_shape: tuple[int, ...] | list[int], itemsize: int, offset: tuple[int, ...] | list[int],
                shape: tuple[int, ...] | list[int]) -> tuple[int, list[int]]:
    """The contiguous byte runs of a box inside a row-major tensor: ``(run_bytes, [start byte of each run])``.

    Trailing dimensions the box covers whole are merged into one run, so a box cut along dim 0 (FSDP's
    ``Shard(0)``) is a single run and a column shard of a matrix is one run per row. The starts come in
    increasing order, which is the box's own row-major order.
    """
    ndim = len(global_shape)
    if len(offset) != ndim or len(shape) != ndim:
        raise ValueError(f"box offset {list(offset)} / shape {list(shape)} do not match a rank-{ndim} tensor")
    for d in range(ndim):
        if offset[d] < 0 or shape[d] < 0 or offset[d] + shape[d] > global_shape[d]:
            raise ValueError(f"box [{list(offset)} + {list(shape)}] lies outside shape {list(global_shape)}")
    count = 1
    for d in shape:
        count *= d
    if count == 0:
        return 0, []
    strides = [itemsize] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * global_shape[d + 1]
    # k: the first dimension from which the box is contiguous (every later dim taken whole).
    k = ndim
    while k > 0 and (k == ndim or (offset[k] == 0 and shape[k] == global_shape[k])):
        k -= 1
    if ndim == 0:
        return itemsize, [0]
    run = shape[k] * strides[k]
    starts = [sum(offset[d] * strides[d] for d in range(ndim))]
    for d in range(k - 1, -1, -1):  # expand over the outer dims, innermost first
        starts = [s + i * strides[d] for i in range(shape[d]) for s in starts] if shape[d] > 1 else starts
    starts.sort()
    return run, starts


def read_region(path: str | os.PathLike[str], data_offset: int, global_shape: tuple[int, ...] | list[int],
                itemsize: int, offset: tuple[int, ...] | list[int], shape: tuple[int, ...] | list[int], out: Any,
                *, label: str = "") -> None:
    """``pread`` a box of a row-major tensor stored at ``data_offset`` in ``path`` into the buffer ``out``.

    Args:
        path: The file.
        data_offset: File offset of the tensor's first byte.
        global_shape: The stored tensor's shape.
        itemsize: Bytes per element.
        offset: Start index of the box per dimension.
        shape: Extent of the box per dimension.
        out: Writable buffer of exactly the box's size, filled in row-major order.
        label: Names the tensor in error messages.

    Raises:
        CheckpointError: Bad box or buffer size, an I/O error, or the file ends early.
    """
    where = label or str(path)
    try:
        run, starts = region_runs(global_shape, itemsize, offset, shape)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    view = memoryview(out)
    if view.nbytes != run * len(starts):
        raise CheckpointError(f"{where}: buffer holds {view.nbytes} bytes, the box needs {run * len(starts)}")
    if not starts:
        return
    view = view.cast("B")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot open the file: {exc}") from exc
    try:
        pos = 0
        for start in starts:
            _pread_exact(fd, view[pos:pos + run], data_offset + start, where)
            pos += run
    finally:
        os.close(fd)


def _pread_exact(fd: int, dest: memoryview, at: int, where: str) -> None:
    """Fill ``dest`` from file offset ``at`` (``os.preadv`` straight into it where the OS has it)."""
    done = 0
    while done < len(dest):
        try:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [dest[done:]], at + done)
            else:  # Windows: no preadv; seek + readinto on the fd
                os.lseek(fd, at + done, os.SEEK_SET)
                with open(fd, "rb", buffering=0, closefd=False) as f:
                    n = f.readinto(dest[done:]) or 0
        except OSError as exc:
            raise CheckpointError(f"{where}: read failed at byte {at + done}: {exc}") from exc
        if n == 0:
            raise CheckpointError(f"{where}: the file ends at byte {at + done}, inside the tensor; it is truncated "
                                  "— delete it and download again")
        done += n
