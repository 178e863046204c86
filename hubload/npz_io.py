"""numpy ``.npz`` archives, read lazily and without pickle.

Names, shapes and dtypes come from the ``.npy`` member headers; an archive holding Python objects is
refused (loading it would need pickle).

numpy is imported inside functions: ``import hubload`` stays light.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any

from hubload.checkpoint import ReaderBase, TensorInfo, canonical_dtype
from hubload.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["NpzReader"]


class NpzReader(ReaderBase):
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

    def get(self, name: str) -> Any:
        """Read one array (``allow_pickle=False``).

        Raises:
            CheckpointError: No such array, or its data is corrupt/truncated.
        """
        import numpy as np

        self._require(name)
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
