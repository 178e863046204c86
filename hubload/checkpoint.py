"""The checkpoint reader contract shared by every format: what a tensor looks like before it is read.

:class:`TensorInfo` and the :class:`CheckpointReader` protocol are what the readers return and implement,
:class:`ReaderBase` is their common plumbing, the dtype helpers map every framework's dtype to one canonical
name, and :func:`to_numpy` turns any reader's tensor into a numpy array. Kept apart from the format modules
(``safetensors_io``, ``npz_io``, ``keras_h5``) and from format detection (``readers``) so that each of those
can import it without cycles.

numpy and ml_dtypes are imported inside functions: ``import hubload`` stays light.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from hubload.errors import CheckpointError

__all__ = [
    "SAFETENSORS_DTYPES",
    "CheckpointReader",
    "ReaderBase",
    "TensorInfo",
    "canonical_dtype",
    "numpy_dtype",
    "to_numpy",
]

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

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, nbytes: int) -> None:
        # Frozen: the fields go straight into the instance dict, one call instead of an object.__setattr__ per
        # field (a load makes a few of these records per tensor; tests check this matches the fields).
        self.__dict__.update(name=name, shape=shape, dtype=dtype, nbytes=nbytes)


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


_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32",
                  "bool_": "bool", "short": "int16"}  # torch aliases and numpy's platform names
_canonical_dtypes: dict[Any, str] = {}  # dtype object -> name, filled as dtypes are seen (a few dozen at most)


def canonical_dtype(dtype: Any) -> str:
    """Canonical dtype name of a numpy, torch or TensorFlow dtype (or a string naming one).

    Args:
        dtype: ``numpy.dtype``, ``torch.dtype``, ``tf.DType``, a safetensors tag ("F32") or a name.

    Returns:
        "float32", "bfloat16", "int64" ... (torch's ``torch.`` prefix dropped).
    """
    try:
        return _canonical_dtypes[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable object; it is named below, not remembered
        pass
    if isinstance(dtype, str):
        name = SAFETENSORS_DTYPES[dtype][0] if dtype in SAFETENSORS_DTYPES else dtype
    elif hasattr(dtype, "is_floating_point") and str(dtype).startswith("torch."):
        name = str(dtype)
    elif isinstance(dtype, type) and dtype.__module__.split(".")[0] in ("numpy", "ml_dtypes"):
        import numpy as np  # a scalar type (np.float32, np.bool_) rather than a dtype: numpy names it

        name = np.dtype(dtype).name
    else:
        name = getattr(dtype, "name", None) or str(dtype)
    name = _DTYPE_ALIASES.get(name.removeprefix("torch."), name.removeprefix("torch."))
    try:
        if len(_canonical_dtypes) < 1024:  # bounded: arbitrary strings must not grow it forever
            _canonical_dtypes[dtype] = name
    except TypeError:
        pass
    return name


def to_numpy(data: Any) -> Any:
    """A numpy array from a reader's tensor (numpy already, or a torch tensor from a ``.pt`` file).

    bfloat16 and float8 torch tensors become ml_dtypes arrays over the same bytes. torch is never imported
    here: a torch tensor (recognised by its type's module) arrives only if torch is loaded already.
    """
    import numpy as np

    if isinstance(data, np.ndarray):
        return data
    if type(data).__module__.split(".")[0] == "torch":
        t = data.detach().cpu()
        dtype_name = canonical_dtype(t.dtype)
        if dtype_name == "bfloat16" or dtype_name.startswith("float8"):
            # numpy has no such types; reinterpret the bytes as ml_dtypes' equivalent.
            import torch

            raw = t.contiguous().view(torch.uint16 if t.element_size() == 2 else torch.uint8)
            return raw.numpy().view(numpy_dtype(dtype_name))
        return t.numpy()
    return np.asarray(data)


# --------------------------------------------------------------------------------------------- readers


class ReaderBase:
    """Plumbing shared by the readers: context manager, ``in``/``len``/iteration and the unknown-name error.

    A reader that knows all its tensors up front keeps them in ``_infos`` (name -> :class:`TensorInfo`);
    ``tensors()`` then returns a copy of it and ``in``/``len``/iteration use it as is. A reader without
    ``_infos`` overrides ``tensors()`` (and may override ``_table()``).
    """

    path: pathlib.Path
    format: str
    layout: str = "torch"
    _infos: dict[str, TensorInfo] | None = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _table(self) -> Mapping[str, Any]:
        """The tensor names (as keys), without copying: ``_infos``, else ``tensors()``."""
        return self._infos if self._infos is not None else self.tensors()

    def __contains__(self, name: object) -> bool:
        return name in self._table()

    def __iter__(self):
        return iter(self.tensors())

    def __len__(self) -> int:
        return len(self._table())

    def tensors(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes (a copy of ``_infos``); no tensor bytes are read."""
        if self._infos is None:  # pragma: no cover - readers without _infos override tensors()
            raise NotImplementedError
        return dict(self._infos)

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def _unknown(self, name: str) -> CheckpointError:
        """Error for a tensor name the checkpoint does not hold."""
        return CheckpointError(f"{self.path}: no tensor named {name!r} in this {self.format} checkpoint "
                               f"({len(self)} tensors)")

    def _require(self, name: str) -> None:
        """Raise :meth:`_unknown` unless the checkpoint holds ``name``."""
        if name not in self:
            raise self._unknown(name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r} format={self.format} layout={self.layout}>"
